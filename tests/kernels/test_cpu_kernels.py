"""tandem's C++ CPU kernels against their torch references: the paged decode attention (vs gather +
SDPA), the per-token ops (RMSNorm, residual add + RMSNorm, SiLU-and-mul, rotary + KV write) and the
sampler's draw; and
the backend choice around them: auto picks them on a CPU where they build, torch where they cannot."""

from __future__ import annotations

import pytest
import torch

from tandem import SamplingParams
from tandem.kernels import cpu_kernels
from tandem.kernels import paged_attention as ref
from tandem.kernels.activation import silu_and_mul_ref
from tandem.kernels.rms_norm import add_rms_norm_ref, rms_norm_ref
from tandem.kernels.rope_kv import rope_and_write_kv_ref
from tandem.kernels.sampling import sample_ref
from tandem.runner.model_runner import resolve_backend_name
from tandem.runner.sampler import resolve_sampling_backend

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler to build the CPU kernel")


def _paged_case(seq_lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype, seed: int = 0):
    """A cache with each sequence's blocks scattered (shuffled ids), tables padded past their rows."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    ids = torch.randperm(num_blocks, generator=g).tolist()
    width = max(blocks_per_seq) + 1
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int64)
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = torch.tensor([ids.pop() for _ in range(n)])
    query = torch.randn(len(seq_lens), heads, head_dim, generator=g).to(dtype)
    return query, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int64)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(12, 4, 64), (4, 4, 32), (6, 2, 36), (8, 1, 128)])
@pytest.mark.parametrize("window,with_sinks", [(None, False), (5, False), (None, True), (5, True)])
def test_matches_reference_fp32(heads, kv_heads, head_dim, window, with_sinks):
    """GQA and MHA, a head_dim with a scalar tail (36), contexts shorter than, equal to and across
    blocks; gpt-oss's attention sinks (one logit per query head, big enough to matter)."""
    case = _paged_case([1, 3, 16, 17, 50], heads, kv_heads, head_dim, 16, torch.float32)
    sinks = torch.randn(heads, generator=torch.Generator().manual_seed(7)) * 2 if with_sinks else None
    expected = ref.paged_decode_attention(*case, scale=head_dim ** -0.5, sliding_window=window, sinks=sinks)
    got = cpu_kernels.paged_decode_attention(*case, scale=head_dim ** -0.5, sliding_window=window, sinks=sinks)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "window"), [(12, 4, 64, None), (6, 2, 36, 7)])
def test_large_batches_take_whole_sequences_per_item(threads, heads, kv_heads, head_dim, window):
    """At 4 sequences per thread or more, one work item covers all of a sequence's kv heads (a
    block's rows read as one piece); below that, one kv head per item. Both give the reference."""
    case = _paged_case([(i * 29) % 70 + 1 for i in range(12)] + [0], heads, kv_heads, head_dim, 16, torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (2, 13):  # under and over the threshold
            part = (case[0][:rows], case[1], case[2], case[3][:rows], case[4][:rows])
            expected = ref.paged_decode_attention(*part, scale=head_dim ** -0.5, sliding_window=window)
            got = cpu_kernels.paged_decode_attention(*part, scale=head_dim ** -0.5, sliding_window=window)
            torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cache_accumulates_in_fp32(dtype):
    query, k_cache, v_cache, tables, lens = _paged_case([7, 40], 8, 2, 64, 8, dtype)
    expected = ref.paged_decode_attention(query.float(), k_cache.float(), v_cache.float(), tables, lens, 0.125)
    got = cpu_kernels.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.125)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=1e-2)


def test_strided_query_and_empty_context():
    """A query that is a view into a wider projection output; a padding row (length 0) gets zeros."""
    query, k_cache, v_cache, tables, lens = _paged_case([9, 0, 20], 4, 2, 16, 4, torch.float32)
    wide = torch.randn(3, 4, 40)
    wide[..., 8:24] = query
    got = cpu_kernels.paged_decode_attention(wide[..., 8:24], k_cache, v_cache, tables, lens, 0.25)
    assert torch.equal(got[1], torch.zeros(4, 16))
    keep = torch.tensor([0, 2])
    expected = ref.paged_decode_attention(query[keep], k_cache, v_cache, tables[keep], lens[keep], 0.25)
    torch.testing.assert_close(got[keep], expected, atol=2e-6, rtol=1e-5)


def test_bad_metadata_is_an_error_not_a_crash():
    query, k_cache, v_cache, tables, lens = _paged_case([5, 6], 4, 2, 16, 4, torch.float32)
    tables[1, 0] = k_cache.shape[0]  # a block id past the cache
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.25)
    with pytest.raises(RuntimeError, match="longer than its block table"):
        cpu_kernels.paged_decode_attention(query, k_cache, v_cache, tables[:, :1], lens, 0.25)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):  # fp32 math would lose fp64's
        cpu_kernels.paged_decode_attention(query.double(), k_cache.double(), v_cache.double(), tables, lens, 0.25)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cpu_kernels.rms_norm(query.double(), torch.ones(16, dtype=torch.float64), 1e-6)


# (dtype, tolerance): fp32 to rounding; bf16/fp16 within one ulp of the reference's roundings
_OP_DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]


@pytest.mark.parametrize(("dtype", "tol"), _OP_DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 300])  # one thread and split across threads
def test_norms_and_activation_match_references(dtype, tol, rows):
    g = torch.Generator().manual_seed(rows)
    x, res = (torch.randn(rows, 72, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(72, generator=g).to(dtype)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), atol=tol, rtol=tol)
    y, h = cpu_kernels.add_rms_norm(x, res, w, 1e-5)
    y_ref, h_ref = add_rms_norm_ref(x, res, w, 1e-5)
    assert torch.equal(h, h_ref)  # the residual sum is exact in every dtype
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    gate_up = torch.randn(rows, 2, 40, generator=g).to(dtype).view(rows, 80) * 4
    torch.testing.assert_close(cpu_kernels.silu_and_mul(gate_up), silu_and_mul_ref(gate_up), atol=tol, rtol=tol)


@pytest.mark.parametrize(("dtype", "tol"), _OP_DTYPES)
def test_rope_and_kv_write_match_reference_on_qkv_views(dtype, tol):
    """q, k and v as the model passes them: strided views into one QKV projection output."""
    g = torch.Generator().manual_seed(1)
    tokens, heads, kv_heads, d = 7, 6, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    q, k, v = (t.view(tokens, -1, d) for t in qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1))
    cos, sin = torch.randn(64, d // 2, generator=g), torch.randn(64, d // 2, generator=g)
    positions = torch.randint(0, 64, (tokens,), generator=g)
    slots = torch.randperm(5 * 4, generator=g)[:tokens]
    caches = [torch.zeros(5, 4, kv_heads, d, dtype=dtype) for _ in range(4)]
    q_ref, k_ref = rope_and_write_kv_ref(positions, q, k, v, cos, sin, caches[0], caches[1], slots)
    q_got, k_got = cpu_kernels.rope_and_write_kv(positions, q, k, v, cos, sin, caches[2], caches[3], slots)
    torch.testing.assert_close(q_got, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k_got, k_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(caches[2], caches[0], atol=tol, rtol=tol)
    assert torch.equal(caches[3], caches[1])  # v is copied as it is
    strided = torch.stack([positions, positions], dim=1)[:, 0]  # indices that are a non-contiguous view
    q_strided, _ = cpu_kernels.rope_and_write_kv(strided, q, k, v, cos, sin, caches[2], caches[3], slots)
    assert not strided.is_contiguous() and torch.equal(q_strided, q_got)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.rope_and_write_kv(positions, q, k, v, cos, sin, caches[2], caches[3], slots + 20)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        cpu_kernels.rope_and_write_kv(positions + 64, q, k, v, cos, sin, caches[2], caches[3], slots)


@pytest.mark.parametrize(("torch_capability", "flags"), [
    ("AVX512", ["-mavx512f", "-DCPU_CAPABILITY_AVX512"]), ("AVX512_BF16", ["-mavx512f", "-DCPU_CAPABILITY_AVX512"]),
    ("AVX2", ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"]), ("DEFAULT", ["-DCPU_CAPABILITY=DEFAULT"]),
    ("SVE256", ["-DCPU_CAPABILITY=DEFAULT"]), ("ZVECTOR", ["-DCPU_CAPABILITY=DEFAULT"])])
def test_build_targets_the_isa_torch_dispatches_to(monkeypatch, torch_capability, flags):
    """No CPU model is named anywhere: the flags follow torch's own runtime choice, and each ISA's
    build has its own library name (a home directory shared by two machines keeps both)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: torch_capability)
    name, got, build_dir = cpu_kernels._build_spec()
    assert set(flags) <= set(got) and build_dir.name == name
    assert ("-mavx512f" in got) == torch_capability.startswith("AVX512") and ("-mavx2" in got) == (
        torch_capability.startswith("AVX512") or torch_capability == "AVX2")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT" if "AVX" in torch_capability
                        else "AVX2")
    assert cpu_kernels._build_spec()[0] != name


def test_sampler_draws_the_references_ids():
    """Greedy rows, temperatures, min-p, a row with -inf logits and rows with top-k or top-p (those go
    through the reference): the same ids as sample_ref from the same noise, exactly."""
    g = torch.Generator().manual_seed(0)
    rows, vocab = 24, 1000  # a vocabulary that is not a multiple of the vector width
    for _ in range(4):
        logits = torch.randn(rows, vocab, generator=g) * 3
        logits[0, :100] = -float("inf")
        logits[1, 5] = logits[1, 7] = 50.0  # a tie for greedy: the first index
        temperature = torch.rand(rows, generator=g) * 1.5 + 0.05
        temperature[:3] = 0.0
        top_k = torch.zeros(rows, dtype=torch.int32)
        top_k[7], top_k[8] = 50, vocab
        top_p = torch.ones(rows)
        top_p[9] = 0.9
        min_p = torch.zeros(rows)
        min_p[10:15] = 0.05
        noise = torch.rand(rows, vocab, generator=g)
        noise[16, :10] = 0.0  # clamped to the smallest normal float, as the reference does
        args = (logits, temperature, top_k, top_p, min_p, noise)
        got = cpu_kernels.sample(*args)
        assert got.dtype == torch.int64 and got[1] == 5
        assert torch.equal(got, sample_ref(*args))


def test_sampler_ties_in_a_rows_tail_go_as_the_reference():
    """Scores equal to the last bit: a tie between the first and the last (tail) token of each
    17-token row; the vector exp and log serve every element, as in torch's own loop over the batch
    (2048 x 17 leaves it no scalar remainder)."""
    rows, vocab = 2048, 17
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(rows, vocab, generator=g)
    logits[:, 16] = logits[:, 0]
    noise = torch.rand(rows, vocab, generator=g)
    noise[:, 16] = noise[:, 0]
    ones, zeros = torch.ones(rows), torch.zeros(rows)
    k, p = torch.zeros(rows, dtype=torch.int32), torch.ones(rows)
    assert torch.equal(cpu_kernels.sample(logits, ones, k, p, zeros, noise), sample_ref(logits, ones, k, p, zeros, noise))


def test_auto_picks_the_cpu_kernel_and_falls_back_without_it(monkeypatch):
    assert resolve_backend_name("auto", torch.device("cpu")) == "cpu"
    assert resolve_sampling_backend("auto", torch.device("cpu"), "cpu") == "cpu"
    assert resolve_sampling_backend("auto", torch.device("cpu"), "torch") == "torch"
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert resolve_backend_name("auto", torch.device("cpu")) == "torch"
    from tandem.model.attention import get_backend

    with pytest.raises(RuntimeError, match="could not be built"):
        get_backend("cpu")


@pytest.mark.parametrize("preset", ["llama3-gqa", "mistral-swa"])
def test_cpu_backend_greedy_equals_torch_backend(make_llm, preset):
    """Batched decodes of different lengths (one outliving the others), chunked prefill, a sliding
    window; on the cpu backend every layer op is a C++ kernel."""
    prompts = [{"prompt_token_ids": [(i * 37 + j * 11) % 500 + 3 for j in range(n)]} for i, n in
               enumerate((1, 17, 40))]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (5, 9, 24)]
    outs = {}
    for backend in ("torch", "cpu"):
        llm = make_llm(preset, attention_backend=backend, max_num_batched_tokens=16)
        assert llm.llm_engine.runner.attention_backend == backend
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs["cpu"] == outs["torch"]


def test_without_a_compiler_the_engine_serves_on_the_torch_path(model_dirs, tmp_path):
    """A machine with no working C++ compiler and no prior build: a warning, then the torch backend."""
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from tandem import LLM, SamplingParams\n"
        "from tandem.kernels import cpu_kernels\n"
        "assert not cpu_kernels.available()\n"
        f"llm = LLM(model={str(model_dirs['llama3-gqa'])!r}, kv_cache_memory='8MiB')\n"
        "assert llm.llm_engine.runner.attention_backend == 'torch'\n"
        "out = llm.generate([{'prompt_token_ids': [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=3))\n"
        "print('tokens', len(out[0].outputs[0].token_ids))\n")
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tokens 3" in done.stdout and "CPU kernels unavailable" in done.stderr


@pytest.mark.parametrize(("rows", "out_features", "in_features"), [(1, 8, 8), (3, 37, 100), (17, 130, 768),
                                                                     (2, 9, 1030)])
def test_int8_linear_matches_its_reference(rows, out_features, in_features):
    """Blocks of 8 channels with a partial last one, K chunks of 512 with a tail, any row count."""
    from tandem.kernels import quant

    g = torch.Generator().manual_seed(rows * out_features)
    q, scale = quant.quantize_int8(torch.randn(out_features, in_features, generator=g))
    x, bias = torch.randn(rows, in_features, generator=g), torch.randn(out_features, generator=g)
    for b in (None, bias):
        expected = quant.int8_linear_ref(x, q, scale, b)
        torch.testing.assert_close(cpu_kernels.int8_linear(x, q, scale, b), expected, rtol=1e-5, atol=1e-4)
    halves = cpu_kernels.int8_linear(x.bfloat16().view(1, rows, in_features), q, scale)
    assert halves.dtype == torch.bfloat16 and halves.shape == (1, rows, out_features)


def test_int8_linear_refuses_what_it_cannot_read():
    q, scale = torch.zeros(4, 16, dtype=torch.int8), torch.ones(4)
    with pytest.raises(RuntimeError, match="int8"):
        cpu_kernels.int8_linear(torch.randn(2, 16), q.float(), scale)
    with pytest.raises(RuntimeError, match="x's K"):
        cpu_kernels.int8_linear(torch.randn(2, 15), q, scale)
    with pytest.raises(RuntimeError, match="scale"):
        cpu_kernels.int8_linear(torch.randn(2, 16), q, torch.ones(3))


@pytest.mark.parametrize("window", [None, 6])
def test_short_queries_run_as_decode_rows_equal_to_the_prefill_path(window):
    """The cpu backend runs queries of up to SHORT_QUERY_TOKENS tokens right after the decodes (draft
    chunks, short prompt tails) as one decode row per token: equal to the torch backend's causal
    attention over the cached prefix; a longer query after them stays a prefill."""
    import numpy as np

    from tandem.model.attention import SHORT_QUERY_TOKENS, CommonAttentionMetadata, get_backend

    g = torch.Generator().manual_seed(5)
    block_size, heads, kv_heads, head_dim = 4, 4, 2, 16
    # as the runner orders them: decodes, short queries, the rest, each by context length, longest first
    query_lens, contexts = [1, 1, SHORT_QUERY_TOKENS, 3, 20], [30, 9, 17, 12, 25]  # context includes the query
    tables, next_block = [], 0
    for n in contexts:
        count = -(-n // block_size)
        tables.append(list(range(next_block, next_block + count))[::-1])  # scattered order
        next_block += count
    k_cache = torch.randn(next_block, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(next_block, block_size, kv_heads, head_dim, generator=g)
    query = torch.randn(sum(query_lens), heads, head_dim, generator=g)
    starts = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int64)
    slots = np.concatenate([[t[p // block_size] * block_size + p % block_size for p in range(n - q, n)]
                            for t, n, q in zip(tables, contexts, query_lens)]).astype(np.int64)
    common = CommonAttentionMetadata(2, starts, np.array(contexts, dtype=np.int64), tables, slots)
    outs = {}
    for name in ("torch", "cpu"):
        backend = get_backend(name)
        meta = backend.make_builder(torch.device("cpu")).build(common)
        outs[name] = backend.attend(query, k_cache, v_cache, meta, head_dim ** -0.5, window)
        if name == "cpu":
            assert meta.num_decode_tokens == 2 + 3 + SHORT_QUERY_TOKENS and len(meta.prefills) == 1
    torch.testing.assert_close(outs["cpu"], outs["torch"], atol=2e-6, rtol=1e-5)
