"""The C++ CPU paged decode attention against the torch reference (gather + SDPA), and the
backend choice around it: auto picks it on a CPU where it builds, the torch path where it cannot."""

from __future__ import annotations

import pytest
import torch

from tandem import SamplingParams
from tandem.kernels import cpu_attention
from tandem.kernels import paged_attention as ref
from tandem.runner.model_runner import resolve_backend_name

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ compiler to build the CPU kernel")


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
@pytest.mark.parametrize("window", [None, 5])
def test_matches_reference_fp32(heads, kv_heads, head_dim, window):
    """GQA and MHA, a head_dim with a scalar tail (36), contexts shorter than, equal to and across blocks."""
    case = _paged_case([1, 3, 16, 17, 50], heads, kv_heads, head_dim, 16, torch.float32)
    expected = ref.paged_decode_attention(*case, scale=head_dim ** -0.5, sliding_window=window)
    got = cpu_attention.paged_decode_attention(*case, scale=head_dim ** -0.5, sliding_window=window)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cache_accumulates_in_fp32(dtype):
    query, k_cache, v_cache, tables, lens = _paged_case([7, 40], 8, 2, 64, 8, dtype)
    expected = ref.paged_decode_attention(query.float(), k_cache.float(), v_cache.float(), tables, lens, 0.125)
    got = cpu_attention.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.125)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=1e-2)


def test_strided_query_and_empty_context():
    """A query that is a view into a wider projection output; a padding row (length 0) gets zeros."""
    query, k_cache, v_cache, tables, lens = _paged_case([9, 0, 20], 4, 2, 16, 4, torch.float32)
    wide = torch.randn(3, 4, 40)
    wide[..., 8:24] = query
    got = cpu_attention.paged_decode_attention(wide[..., 8:24], k_cache, v_cache, tables, lens, 0.25)
    assert torch.equal(got[1], torch.zeros(4, 16))
    keep = torch.tensor([0, 2])
    expected = ref.paged_decode_attention(query[keep], k_cache, v_cache, tables[keep], lens[keep], 0.25)
    torch.testing.assert_close(got[keep], expected, atol=2e-6, rtol=1e-5)


def test_bad_metadata_is_an_error_not_a_crash():
    query, k_cache, v_cache, tables, lens = _paged_case([5, 6], 4, 2, 16, 4, torch.float32)
    tables[1, 0] = k_cache.shape[0]  # a block id past the cache
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_attention.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.25)
    with pytest.raises(RuntimeError, match="longer than its block table"):
        cpu_attention.paged_decode_attention(query, k_cache, v_cache, tables[:, :1], lens, 0.25)


def test_auto_picks_the_cpu_kernel_and_falls_back_without_it(monkeypatch):
    assert resolve_backend_name("auto", torch.device("cpu")) == "cpu"
    monkeypatch.setattr(cpu_attention, "available", lambda: False)
    assert resolve_backend_name("auto", torch.device("cpu")) == "torch"
    from tandem.model.attention import get_backend

    with pytest.raises(RuntimeError, match="could not be built"):
        get_backend("cpu")


@pytest.mark.parametrize("preset", ["llama3-gqa", "mistral-swa"])
def test_cpu_backend_greedy_equals_torch_backend(make_llm, preset):
    """Batched decodes of different lengths (one outliving the others), chunked prefill, a sliding window."""
    prompts = [{"prompt_token_ids": [(i * 37 + j * 11) % 500 + 3 for j in range(n)]} for i, n in
               enumerate((1, 17, 40))]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (5, 9, 24)]
    outs = {}
    for backend in ("torch", "cpu"):
        llm = make_llm(preset, attention_backend=backend, max_num_batched_tokens=16)
        assert llm.llm_engine.runner.attention_backend == backend
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs["cpu"] == outs["torch"]
