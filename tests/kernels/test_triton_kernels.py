"""Every Triton kernel against its torch reference (on CPU through TRITON_INTERPRET=1, set in
conftest), on small shapes: odd lengths, block boundaries, GQA ratios, head_dim 64/128, empty and
single-token sequences, sliding windows; then whole models on the Triton backend vs the torch one."""

from __future__ import annotations

import pytest
import torch

from tandem import SamplingParams
from tandem.kernels import activation, rms_norm, rope_kv, sampling
from tandem.kernels import paged_attention as ref
from tandem.kernels import triton_attention as tri
from tandem.runner.sampler import apply_token_bitmask_torch


def _cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(num_blocks * 31 + block_size)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def _tables(lens: list[int], block_size: int, num_blocks: int, seed: int) -> torch.Tensor:
    """Distinct random blocks per sequence, padded to the widest."""
    g = torch.Generator().manual_seed(seed)
    width = max(1, max(-(-n // block_size) for n in lens))
    return torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in lens])


def _decode_ref(q, k, v, tables, lens, scale, window, sinks=None):
    rows = []
    for i, n in enumerate(lens.tolist()):
        if n == 0:
            rows.append(torch.zeros_like(q[i]))
        else:
            rows.append(ref.paged_decode_attention(q[i:i + 1], k, v, tables[i:i + 1], lens[i:i + 1], scale,
                                                   sliding_window=window, sinks=sinks)[0])
    return torch.stack(rows)


def _sinks(heads: int, with_sinks: bool) -> torch.Tensor | None:
    """gpt-oss attention sinks, big enough to take a real share of every softmax."""
    return torch.randn(heads, generator=torch.Generator().manual_seed(9)) * 2 if with_sinks else None


# (40, 16, 1, 16): MLA's form, every query head over one cached latent row of 32 + 8; (288, 24, 1, 16):
# a row wider than 256, whose 24 heads split over two programs of 16
@pytest.mark.parametrize("head_dim,heads,kv_heads,block_size", [(64, 4, 4, 16), (128, 8, 2, 16), (64, 8, 1, 8),
                                                                (16, 6, 2, 32), (40, 16, 1, 16), (288, 24, 1, 16)])
@pytest.mark.parametrize("window,with_sinks", [(None, False), (5, False), (None, True), (5, True)])
def test_paged_decode_attention_matches_reference(head_dim, heads, kv_heads, block_size, window, with_sinks):
    lens = torch.tensor([1, block_size, block_size + 1, 0, 3 * block_size - 3, 57])
    k, v = _cache(40, block_size, kv_heads, head_dim)
    tables = _tables(lens.tolist(), block_size, 40, head_dim)
    q = torch.randn(len(lens), heads, head_dim, generator=torch.Generator().manual_seed(1))
    sinks = _sinks(heads, with_sinks)
    expected = _decode_ref(q, k, v, tables, lens, head_dim ** -0.5, window, sinks)
    for splits in (1, 3):  # split-K must agree with one pass
        got = tri.paged_decode_attention(q, k, v, tables, lens, head_dim ** -0.5, window, num_splits=splits,
                                         sinks=sinks)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_paged_decode_attention_empty_batch():
    k, v = _cache(4, 16, 2, 64)
    out = tri.paged_decode_attention(torch.empty(0, 4, 64), k, v, torch.empty(0, 1, dtype=torch.int64),
                                     torch.empty(0, dtype=torch.int64), 0.125)
    assert out.shape == (0, 4, 64)


@pytest.mark.parametrize("head_dim,heads,kv_heads,block_size", [(64, 4, 2, 16), (128, 4, 4, 16), (32, 8, 2, 8),
                                                                (40, 16, 1, 16)])
@pytest.mark.parametrize("window,with_sinks", [(None, False), (6, False), (6, True)])
def test_paged_prefill_attention_varlen_matches_reference(head_dim, heads, kv_heads, block_size, window, with_sinks):
    # (chunk length, context length): whole prompt, chunk after a cached prefix, one token, block edges
    chunks = [(5, 5), (1, 18), (20, 40), (block_size, 2 * block_size), (33, 33)]
    k, v = _cache(40, block_size, kv_heads, head_dim)
    tables = _tables([c for _, c in chunks], block_size, 40, head_dim + block_size)
    starts = torch.tensor([0] + [q for q, _ in chunks]).cumsum(0).to(torch.int32)
    q = torch.randn(int(starts[-1]), heads, head_dim, generator=torch.Generator().manual_seed(2))
    ctx = torch.tensor([c for _, c in chunks], dtype=torch.int32)
    sinks = _sinks(heads, with_sinks)
    got = tri.paged_prefill_attention_varlen(q, k, v, tables, starts, ctx, head_dim ** -0.5, window, sinks=sinks)
    for i, (_, ctx_len) in enumerate(chunks):
        sl = slice(int(starts[i]), int(starts[i + 1]))
        # the reference reads only the blocks the context covers
        table = tables[i][:-(-ctx_len // block_size)]
        expected = ref.paged_prefill_attention(q[sl], k, v, table, ctx_len, head_dim ** -0.5, sliding_window=window,
                                               sinks=sinks)
        torch.testing.assert_close(got[sl], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,cols", [(1, 64), (7, 48), (3, 200)])
def test_rms_norm_and_fused_add(dtype, rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    x, r, w = (torch.randn(rows, cols, generator=g).to(dtype), torch.randn(rows, cols, generator=g).to(dtype),
               torch.randn(cols, generator=g).to(dtype))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(rms_norm.rms_norm(x, w, 1e-6), rms_norm.rms_norm_ref(x, w, 1e-6), **tol)
    y, h = rms_norm.add_rms_norm(x, r, w, 1e-5)
    y_ref, h_ref = rms_norm.add_rms_norm_ref(x, r, w, 1e-5)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, **tol)
    assert rms_norm.rms_norm(x[:0], w, 1e-6).shape == (0, cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,n", [(1, 8), (5, 40), (2, 1500)])
def test_silu_and_mul(dtype, rows, n):
    x = torch.randn(rows, 2 * n, generator=torch.Generator().manual_seed(n)).to(dtype)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(activation.silu_and_mul(x), activation.silu_and_mul_ref(x), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (8, 1, 128), (6, 6, 16)])
def test_rope_and_kv_write(dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads + head_dim)
    t = 7
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim)  # strided
    positions = torch.tensor([0, 1, 15, 16, 17, 40, 3])
    cos, sin = torch.randn(64, head_dim // 2, generator=g), torch.randn(64, head_dim // 2, generator=g)
    slots = torch.tensor([0, 5, 16, 31, 17, 40, 2])
    caches = [torch.zeros(3, 16, kv_heads, head_dim, dtype=dtype) for _ in range(4)]
    q1, k1 = rope_kv.rope_and_write_kv(positions, q, k, v, cos, sin, caches[0], caches[1], slots)
    q2, k2 = rope_kv.rope_and_write_kv_ref(positions, q, k, v, cos, sin, caches[2], caches[3], slots)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-3, rtol=4e-3)
    for got, expected in ((q1, q2), (k1, k2), (caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(got, expected, **tol)


def _sampling_rows(vocab: int, seed: int):
    """One row per case: greedy, temperature only, top-k (1, small, V, > V), top-p, min-p, combined,
    tied logits, rows with -inf (a min_tokens mask) and a row with one finite logit."""
    g = torch.Generator().manual_seed(seed)
    cases = [(0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.0, 1, 1.0, 0.0), (1.0, vocab, 1.0, 0.0),
             (1.0, vocab + 9, 1.0, 0.0), (1.0, 0, 0.5, 0.0), (1.3, 0, 0.95, 0.0), (1.0, 0, 1.0, 0.1),
             (0.5, 40, 0.8, 0.05), (2.0, 3, 0.3, 0.0), (1.0, 0, 0.9, 0.0), (1.0, 7, 0.99, 0.0), (1.0, 2, 1.0, 0.0)]
    logits = torch.randn(len(cases), vocab, generator=g) * 3
    logits[11] = torch.round(logits[11])  # many ties, at the top-p cut too
    logits[12, 1::3] = -float("inf")
    logits[13] = -float("inf")
    logits[13, vocab // 2] = 0.5
    temp, k, p, minp = (torch.tensor(col) for col in zip(*cases))
    return logits, temp.float(), k.to(torch.int32), p.float(), minp.float(), g


@pytest.mark.parametrize("vocab", [1, 13, 257, 5000])  # 5000: more than one 4096-wide block per row
def test_sampling_kernel_matches_reference(vocab):
    logits, temp, k, p, minp, g = _sampling_rows(vocab, vocab)
    for _ in range(3):
        noise = torch.rand(logits.shape, generator=g)
        expected = sampling.sample_ref(logits, temp, k, p, minp, noise)
        assert sampling.sample(logits, temp, k, p, minp, noise).tolist() == expected.tolist()
    assert sampling.sample(logits[:0], temp[:0], k[:0], p[:0], minp[:0], noise[:0]).shape == (0,)


# -- whole models on the Triton backend --------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["llama3-gqa", "mistral-swa", "qwen3-qknorm", "qwen3-moe", "glm4-moe", "gpt-oss",
                                    "deepseek-v3"])
def test_triton_backend_greedy_equals_torch_backend(make_llm, preset):
    """Chunked prefill (16-token budget), prefix hits and batched decodes all go through the kernels;
    the seeded top-k/top-p request draws through the sampling kernel from the same noise."""
    prompts = [{"prompt_token_ids": [(i * 37 + j * 11) % 500 + 3 for j in range(n)]} for i, n in
               enumerate((1, 17, 40))]
    prompts.append({"prompt_token_ids": prompts[2]["prompt_token_ids"][:32] + [7, 8, 9]})  # a prefix hit
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)] * 3 + \
        [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=11, max_tokens=6, ignore_eos=True)]  # sampler kernel
    outs = {}
    for backend in ("torch", "triton"):
        llm = make_llm(preset, attention_backend=backend, max_num_batched_tokens=16)
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs["triton"] == outs["torch"]


def test_padded_static_decode_path_equals_eager(make_llm):
    """The CUDA-graph decode path (static buffers, batches padded to a captured size, padding rows
    writing to the scratch block) run eagerly on CPU: same tokens as the eager torch backend."""
    prompts = [{"prompt_token_ids": [(i * 53 + j * 7) % 500 + 3 for j in range(n)]} for i, n in enumerate((5, 20, 33))]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (3, 7, 9)]  # batch 3 -> 2 -> 1
    ref_llm = make_llm("llama3-gqa")
    expected = [o.outputs[0].token_ids for o in ref_llm.generate(prompts, params)]
    llm = make_llm("llama3-gqa", attention_backend="triton", cuda_graph_sizes=[1, 4])
    graphs = llm.llm_engine.runner.decode_graphs
    assert graphs is not None and not graphs.graphs  # no CUDA here: nothing captured, same buffers
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    assert graphs.steps >= 8  # every decode step of the batch went through the padded path
    scratch = llm.llm_engine.runner.num_blocks
    k_cache = llm.llm_engine.runner.model.attention_layers()[0].k_cache
    assert k_cache.shape[0] == scratch + 1 and k_cache[scratch].abs().sum() > 0  # padding wrote only there


def test_padded_decode_path_samples_only_the_chunks_that_sample(make_llm):
    """A one-token prompt chunk that does not sample yet (the rest of its prompt came from the
    prefix cache) rides in a decode-only step: its logits row must not shift the others' tokens."""
    outs = []
    for graph_sizes in (None, [1, 2, 4, 8]):
        llm = make_llm("llama3-gqa", cuda_graph_sizes=graph_sizes, max_num_batched_tokens=3, block_size=4)
        cached = [(j * 37) % 400 + 5 for j in range(18)]
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        llm.generate([{"prompt_token_ids": cached}], params, use_tqdm=False)
        prompts = [[11], [12], cached[:16] + [5, 6]]  # the third: 16 cached, two 1-token chunks
        outs.append([o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                  use_tqdm=False)])
    assert outs[0] == outs[1]


def test_triton_backend_without_gpu_or_interpreter_says_so(monkeypatch):
    from tandem.model.attention import get_backend

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        get_backend("triton")


@pytest.mark.parametrize("vocab", [31, 1000, 5000])
def test_token_bitmask_kernel_matches_reference(vocab):
    """Structured outputs' mask: bit t % 32 of word t // 32 allows token t; the rest become -inf."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=g)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1  # a row without a grammar: everything allowed
    expected, got, on_cpu = logits.clone(), logits.clone(), logits.clone()
    sampling.apply_token_bitmask_ref(expected, bitmask)
    sampling.apply_token_bitmask(got, bitmask)
    apply_token_bitmask_torch(on_cpu, bitmask)  # the torch backend's CPU path (xgrammar's loop)
    assert torch.equal(got, expected) and torch.equal(on_cpu, expected)
    assert torch.equal(got[1], logits[1])
    allowed = [t for t in range(vocab) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1]
    assert torch.isfinite(got[0]).nonzero().flatten().tolist() == allowed


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("q_len", [1, 16, 33])
def test_prefill_without_a_prefix_attends_to_its_own_kv_as_to_the_cache(q_len, window):
    """The torch path skips gathering a fresh prompt's K/V back from the cache: same result."""
    block_size, kv_heads, head_dim = 16, 2, 32
    k_cache, v_cache = _cache(12, block_size, kv_heads, head_dim)
    table = torch.randperm(12, generator=torch.Generator().manual_seed(q_len))[:-(-q_len // block_size)]
    slots = (table.repeat_interleave(block_size) * block_size + torch.arange(block_size).repeat(len(table)))[:q_len]
    key, value = torch.randn(2, q_len, kv_heads, head_dim, generator=torch.Generator().manual_seed(5))
    ref.write_kv_cache(key, value, k_cache, v_cache, slots)
    q = torch.randn(q_len, 4, head_dim, generator=torch.Generator().manual_seed(6))
    gathered = ref.paged_prefill_attention(q, k_cache, v_cache, table, q_len, 0.17, sliding_window=window)
    own = ref.paged_prefill_attention(q, k_cache, v_cache, table, q_len, 0.17, sliding_window=window,
                                      own_kv=(key, value))
    torch.testing.assert_close(own, gathered, atol=1e-6, rtol=1e-5)
