"""FP8 KV cache kernels: quantize-on-write / dequantize-on-read (tandem/kernels/kv_quant.py) in the
torch references, tandem's C++ CPU kernels and the Triton kernels (TRITON_INTERPRET=1 on a CPU).

Every backend's attention over an FP8 cache equals the reference attention over the dequantized
cache; every fused rotary + KV write stores the same FP8 bytes as the reference; a write then read
is within FP8's rounding error."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import cpu_kernels, rope_kv
from tandem.kernels import paged_attention as ref
from tandem.kernels import triton_attention as tri
from tandem.kernels.kv_quant import dequantize, fp8_grid, fp8_max, quantize

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
needs_cpu_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the CPU kernels")


def _fp8_case(lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int, fp8: torch.dtype,
              qdtype: torch.dtype = torch.float32, seed: int = 0):
    """(query, FP8 K cache, FP8 V cache, tables, lens, k_scale, v_scale), blocks scattered."""
    g = torch.Generator().manual_seed(seed)
    blocks = [max(1, -(-n // block_size)) for n in lens]
    num_blocks = sum(blocks) + 2
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_scale, v_scale = torch.tensor([0.02]), torch.tensor([0.05])
    k = quantize(torch.randn(shape, generator=g) * 3, k_scale, fp8)
    v = quantize(torch.randn(shape, generator=g) * 5, v_scale, fp8)
    ids = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int64)
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.tensor([ids.pop() for _ in range(n)])
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(qdtype)
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int64), k_scale, v_scale


def _dequantized(k, v, k_scale, v_scale, dtype):
    return dequantize(k, k_scale, dtype), dequantize(v, v_scale, dtype)


# -- torch references -------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8", FP8)
def test_write_then_read_is_within_fp8_rounding(fp8):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 2, 16, generator=g) * torch.exp2(torch.randint(-8, 6, (40, 1, 1), generator=g).float())
    cache, other = torch.zeros(8, 8, 2, 16, dtype=fp8), torch.zeros(8, 8, 2, 16, dtype=fp8)
    slots = torch.randperm(64, generator=g)[:40]
    scale = torch.tensor([x.abs().max().item() / fp8_max(fp8)])  # calibrated: nothing saturates
    ref.write_kv_cache(x, x, cache, other, slots, scale, scale)
    back = dequantize(cache.view(-1, 2, 16)[slots], scale, torch.float32)
    mant, emin = fp8_grid(fp8)
    # half an ulp: relative 2^-(mant+1) for normals, absolute half the subnormal step below them
    bound = x.abs() * 2.0 ** -(mant + 1) + scale * 2.0 ** (emin - mant - 1)
    assert ((back - x).abs() <= bound).all()
    assert torch.equal(cache.view(torch.uint8), other.view(torch.uint8))


@pytest.mark.parametrize("fp8", FP8)
def test_values_past_the_range_saturate(fp8):
    cache = torch.zeros(1, 4, 1, 2, dtype=fp8)
    x = torch.tensor([[[1e9, -1e9]], [[3.0, -3.0]]])
    ref.write_kv_cache(x, x, cache, torch.zeros_like(cache), torch.tensor([0, 1]), 0.5, 0.5)
    back = dequantize(cache.view(-1, 1, 2)[:2], 0.5, torch.float32)
    assert back[0].tolist() == [[fp8_max(fp8) * 0.5, -fp8_max(fp8) * 0.5]] and back[1].tolist() == [[3.0, -3.0]]


@pytest.mark.parametrize("fp8", FP8)
def test_reference_attention_reads_fp8_pages_as_their_dequantized_values(fp8):
    q, k, v, tables, lens, ks, vs = _fp8_case([1, 9, 33], 8, 2, 32, 8, fp8)
    kd, vd = _dequantized(k, v, ks, vs, torch.float32)
    got = ref.paged_decode_attention(q, k, v, tables, lens, 0.2, k_scale=ks, v_scale=vs)
    assert torch.equal(got, ref.paged_decode_attention(q, kd, vd, tables, lens, 0.2))
    # a prompt chunk with no prefix reads the cache (the rounded K/V), never its own unrounded K/V
    own = (torch.randn(9, 2, 32), torch.randn(9, 2, 32))
    got = ref.paged_prefill_attention(q[:1].expand(9, -1, -1), k, v, tables[1], 9, 0.2, own_kv=own, k_scale=ks,
                                      v_scale=vs)
    assert torch.equal(got, ref.paged_prefill_attention(q[:1].expand(9, -1, -1), kd, vd, tables[1], 9, 0.2))


# -- C++ CPU kernels --------------------------------------------------------------------------------
@needs_cpu_kernels
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), [(8, 2, 64, 16), (6, 6, 36, 4),
                                                                           (8, 1, 24, 8)])
@pytest.mark.parametrize("window", [None, 5])
def test_cpu_decode_reads_fp8_pages(fp8, heads, kv_heads, head_dim, block_size, window):
    q, k, v, tables, lens, ks, vs = _fp8_case([1, 3, 16, 17, 50], heads, kv_heads, head_dim, block_size, fp8)
    kd, vd = _dequantized(k, v, ks, vs, torch.float32)
    expected = ref.paged_decode_attention(q, kd, vd, tables, lens, head_dim ** -0.5, sliding_window=window)
    got = cpu_kernels.paged_decode_attention(q, k, v, tables, lens, head_dim ** -0.5, window, ks, vs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@needs_cpu_kernels
@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float16])
def test_cpu_decode_fp8_cache_with_a_half_precision_query(qdtype):
    q, k, v, tables, lens, ks, vs = _fp8_case([7, 40], 8, 2, 64, 8, torch.float8_e4m3fn, qdtype)
    kd, vd = _dequantized(k, v, ks, vs, torch.float32)
    expected = ref.paged_decode_attention(q.float(), kd, vd, tables, lens, 0.125)
    got = cpu_kernels.paged_decode_attention(q, k, v, tables, lens, 0.125, None, ks, vs)
    assert got.dtype == qdtype
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=1e-2)


def _rope_case(fp8: torch.dtype, qdtype: torch.dtype, heads: int = 4, kv_heads: int = 2, head_dim: int = 32):
    g = torch.Generator().manual_seed(5)
    t = 11
    qkv = (torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g) * 4).to(qdtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim)
    angles = torch.rand(64, head_dim // 2, generator=g) * 6
    slots = torch.randperm(6 * 4, generator=g)[:t]
    caches = [torch.zeros(6, 4, kv_heads, head_dim, dtype=fp8) for _ in range(4)]
    return (torch.randint(0, 64, (t,), generator=g), q, k, v, angles.cos(), angles.sin()), caches, slots


def _check_rope_writes_like_the_reference(kernel, fp8, qdtype):
    """The rotation agrees with the reference's to its rounding; the cache holds exactly the
    reference quantization of the kernel's own rotated k, and of v."""
    args, (k1, v1, k2, v2), slots = _rope_case(fp8, qdtype)
    ks, vs = torch.tensor([0.03]), torch.tensor([0.07])
    q_ref, k_ref = rope_kv.rope_and_write_kv_ref(*args, k1, v1, slots, ks, vs)
    q_got, k_got = kernel(*args, k2, v2, slots, ks, vs)
    tol = 1e-5 if qdtype == torch.float32 else 1e-2
    torch.testing.assert_close(q_got, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k_got, k_ref, atol=tol, rtol=tol)
    assert torch.equal(k2.view(-1, *k_got.shape[1:])[slots].view(torch.uint8), quantize(k_got, ks, fp8).view(torch.uint8))
    assert torch.equal(v2.view(torch.uint8), v1.view(torch.uint8))


@needs_cpu_kernels
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16])
def test_cpu_rope_writes_the_reference_fp8_bytes(fp8, qdtype):
    _check_rope_writes_like_the_reference(cpu_kernels.rope_and_write_kv, fp8, qdtype)


# -- Triton (interpreted on a CPU) ------------------------------------------------------------------
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "window"), [(8, 2, 64, 16, None),
                                                                                     (6, 6, 24, 8, 5)])
def test_triton_decode_reads_fp8_pages(fp8, heads, kv_heads, head_dim, block_size, window):
    q, k, v, tables, lens, ks, vs = _fp8_case([1, 17, 0, 45], heads, kv_heads, head_dim, block_size, fp8)
    kd, vd = _dequantized(k, v, ks, vs, torch.float32)
    expected = ref.paged_decode_attention(q, kd, vd, tables, lens, head_dim ** -0.5, sliding_window=window)
    expected[2] = 0  # a context of length 0 attends to nothing
    for splits in (1, 3):
        got = tri.paged_decode_attention(q, k, v, tables, lens, head_dim ** -0.5, window, num_splits=splits,
                                         k_scale=ks, v_scale=vs)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("window", [None, 6])
def test_triton_prefill_reads_fp8_pages(fp8, window):
    block_size, heads, kv_heads, head_dim = 8, 4, 2, 32
    chunks = [(5, 5), (1, 18), (20, 37)]  # (chunk, context): whole prompt, decode-like, after a prefix
    q, k, v, tables, _, ks, vs = _fp8_case([c for _, c in chunks], heads, kv_heads, head_dim, block_size, fp8)
    kd, vd = _dequantized(k, v, ks, vs, torch.float32)
    starts = torch.tensor([0] + [n for n, _ in chunks]).cumsum(0).to(torch.int32)
    query = torch.randn(int(starts[-1]), heads, head_dim, generator=torch.Generator().manual_seed(9))
    ctx = torch.tensor([c for _, c in chunks], dtype=torch.int32)
    got = tri.paged_prefill_attention_varlen(query, k, v, tables, starts, ctx, 0.17, window, k_scale=ks, v_scale=vs)
    for i, (_, ctx_len) in enumerate(chunks):
        rows = slice(int(starts[i]), int(starts[i + 1]))
        table = tables[i][:-(-ctx_len // block_size)]
        expected = ref.paged_prefill_attention(query[rows], kd, vd, table, ctx_len, 0.17, sliding_window=window)
        torch.testing.assert_close(got[rows], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("qdtype", [torch.float32, torch.float16])
def test_triton_rope_writes_the_reference_fp8_bytes(fp8, qdtype):
    _check_rope_writes_like_the_reference(rope_kv.rope_and_write_kv, fp8, qdtype)


@pytest.mark.parametrize("fp8", FP8)
def test_triton_fp8_rounding_is_torchs_on_every_grid_point_and_tie(fp8):
    """Rounding to nearest even, ties and subnormals included, and a zero keeps its sign (Triton's
    interpreter alone rounds half-up and loses the carry into the exponent)."""
    grid = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    grid = grid[torch.isfinite(grid)].unique()
    ties = (grid[1:] + grid[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(512, generator=g) * torch.exp2(torch.randint(-24, 18, (512,), generator=g).float())
    values = torch.cat([grid, ties, -ties, wide, torch.tensor([0.0, -0.0, 1e9, -1e9])])
    values = torch.cat([values, torch.zeros(-len(values) % 128)]).view(-1, 1, 128)
    t = values.shape[0]
    caches = [torch.zeros(t, 1, 1, 128, dtype=fp8) for _ in range(4)]
    args = (torch.zeros(t, dtype=torch.int64), torch.zeros(t, 1, 128), values, values, torch.ones(1, 64),
            torch.zeros(1, 64))  # cos 1, sin 0: k is written as it is
    one = torch.ones(1)
    rope_kv.rope_and_write_kv_ref(*args, caches[0], caches[1], torch.arange(t), one, one)
    rope_kv.rope_and_write_kv(*args, caches[2], caches[3], torch.arange(t), one, one)
    assert torch.equal(caches[2].view(torch.uint8), caches[0].view(torch.uint8))
