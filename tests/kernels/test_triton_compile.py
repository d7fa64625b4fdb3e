"""Every Triton kernel compiles for Hopper (sm_90) with the argument types a GPU run gives it.

The interpreter (how CI runs the kernels) does not type-check: a kernel can pass every CPU test
and still fail to compile on the GPU. So this test records each kernel launch of a bf16 model on
the Triton backend (prefill, decode with and without the padded graph path, sliding window,
sampling with top-k/top-p; a bf16 and an FP8 KV cache) plus the attention wrappers at head_dim 128
over bf16 and FP8 pages, maps the arguments to Triton's signature types, and compiles each distinct
launch for sm_90 in a subprocess without the interpreter (Triton ships ptxas, so no GPU is needed)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from tandem import SamplingParams
from tandem.kernels import quant, quant_triton, sampling
from tandem.kernels import triton_attention as tri

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
          torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}


_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def _signature(fn, args: tuple, kwargs: dict) -> tuple[str, str, dict, dict, dict]:
    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args)) | kwargs
    types, consts = {}, {}
    for name, param in params.items():
        value = bound.get(name, param.default)
        if "constexpr" in str(param.annotation) or value is None:
            consts[name] = value
        elif isinstance(value, torch.Tensor):
            types[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            types[name] = "i1"
        elif isinstance(value, int):
            types[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            types[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{name}: cannot type {type(value).__name__}")
    options = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
    return fn.__module__, fn.__name__, types, consts, options


@pytest.fixture
def launches(monkeypatch):
    """The distinct (module, kernel, types, constexprs) launched while the fixture is live."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: dict[str, tuple] = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        sig = _signature(self.fn, args, kwargs)
        seen.setdefault(json.dumps(sig, sort_keys=True, default=str), sig)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


_COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
failed = []
SM90_SHARED = 232448  # bytes of shared memory one block may use on an H100/H200
for module, name, types, consts, options in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(module), name)
    sig = {a: types.get(a, "constexpr") for a in fn.arg_names}
    try:
        compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # noqa: BLE001 - report every kernel that fails, not only the first
        failed.append(f"{name} {types} {consts}: {type(e).__name__}: {str(e)[-800:]}")
        continue
    if compiled.metadata.shared > SM90_SHARED:  # compiles, but would be refused at launch
        failed.append(f"{name} {consts}: {compiled.metadata.shared} bytes of shared memory > {SM90_SHARED}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _compile_for_sm90(launches: dict) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(list(launches.values())), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on a random bf16 model
def test_every_kernel_compiles_for_hopper_as_a_gpu_run_launches_it(make_llm, launches):
    pytest.importorskip("triton.backends.nvidia")
    for graphs, kv_cache_dtype in ((None, "auto"), ([1, 2, 4], "auto"), (None, "fp8"), ([1, 2], "fp8_e5m2")):
        llm = make_llm("llama3-gqa", attention_backend="triton", dtype="bfloat16", cuda_graph_sizes=graphs,
                       kv_cache_dtype=kv_cache_dtype)
        prompts = [{"prompt_token_ids": [(i * 37 + j) % 400 + 3 for j in range(n)]} for i, n in enumerate((3, 21))]
        llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                               SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, max_tokens=3,
                                              ignore_eos=True)], use_tqdm=False)
    # the 8B shape's attention: head_dim 128, 4 query heads per KV head, block 16, int64 lengths
    # as the runner passes them, with and without a sliding window and sinks; bf16 and FP8 pages
    tables = torch.arange(8, dtype=torch.int64).view(2, 4)
    scales = {"k_scale": torch.tensor([0.5]), "v_scale": torch.tensor([0.25])}
    for cache_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        k, v = (torch.randn(8, 16, 2, 128).to(cache_dtype) for _ in range(2))
        for window, sinks in ((None, None), (7, None), (7, torch.randn(8))):  # gpt-oss: sinks, fp32
            tri.paged_decode_attention(torch.randn(2, 8, 128, dtype=torch.bfloat16), k, v, tables,
                                       torch.tensor([40, 9]), 0.088, sliding_window=window, sinks=sinks, **scales)
            tri.paged_prefill_attention_varlen(torch.randn(12, 8, 128, dtype=torch.bfloat16), k, v, tables,
                                               torch.tensor([0, 5, 12], dtype=torch.int32),
                                               torch.tensor([30, 7], dtype=torch.int32), 0.088,
                                               sliding_window=window, sinks=sinks, **scales)
    # structured outputs' mask over float32 logits, as the sampler applies it
    sampling.apply_token_bitmask(torch.randn(2, 1000), torch.full((2, 32), -1, dtype=torch.int32))
    names = {sig[1] for sig in launches.values()}
    fp8 = {sig[1] for sig in launches.values() if any(t.startswith("*fp8") for t in sig[2].values())}
    assert {"_decode_split_kernel", "_prefill_kernel", "_rope_kv_kernel"} <= fp8, fp8
    assert {"_decode_split_kernel", "_decode_reduce_kernel", "_prefill_kernel", "_rope_kv_kernel",
            "_rms_norm_kernel", "_silu_and_mul_kernel", "_sample_kernel", "_apply_bitmask_kernel"} <= names, names
    _compile_for_sm90(launches)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # bf16 dots interpreted on their raw bits (below)
def test_quantized_linear_kernels_compile_for_hopper(launches, monkeypatch):
    """Every quantized-linear kernel as a GPU run launches it, fp32 and bf16 activations, decode-
    and prefill-sized row tiles, with and without bias. The interpreter's fp32 stand-in for bf16
    dots is turned off, so the bf16 launches are the GPU's (their interpreted numbers are garbage)."""
    pytest.importorskip("triton.backends.nvidia")
    monkeypatch.setattr(quant_triton, "_FP32_DOT", False)
    w = torch.randn(130, 200) * 0.05
    int8, fp8, fp8_block = quant.quantize_int8(w), quant.quantize_fp8(w), quant.quantize_fp8(w, block=True)
    mxfp4, nvfp4 = quant.quantize_mxfp4(w[:, :192]), quant.quantize_nvfp4(w[:, :192])
    for dtype in (torch.float32, torch.bfloat16):
        for m in (3, 40):  # BLOCK_M 16 and 64
            x, bias = torch.randn(m, 200, dtype=dtype), torch.randn(130, dtype=dtype)
            quant_triton.int8_linear(x, *int8, bias)
            quant_triton.fp8_linear(x, *fp8)
            quant_triton.fp8_linear(x, *fp8_block, bias)
            quant_triton.fp8_w8a8_linear(x, *fp8, bias)
            quant_triton.mxfp4_linear(x[:, :192], *mxfp4)
            quant_triton.nvfp4_linear(x[:, :192], *nvfp4, bias)
    names = {sig[1] for sig in launches.values()}
    assert names == {"_scaled_mm_kernel", "_per_token_fp8_kernel", "_fp4_mm_kernel"}, names
    _compile_for_sm90(launches)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # bf16 dots interpreted on their raw bits (below)
def test_fused_moe_kernel_compiles_for_hopper(launches, monkeypatch):
    """The grouped GEMMs of fused MoE as a GPU run launches them: bf16 and fp32, decode- and
    prefill-sized row blocks (BLOCK_M 16 and 64), both GEMMs (gathering tokens, then scaled), with
    and without expert biases."""
    pytest.importorskip("triton.backends.nvidia")
    from tandem.kernels import moe, moe_triton

    monkeypatch.setattr(moe_triton, "_FP32_DOT", False)
    for dtype in (torch.float32, torch.bfloat16):
        for t in (3, 40):
            x = torch.randn(t, 64, dtype=dtype)
            w13, w2 = torch.randn(8, 96, 64, dtype=dtype), torch.randn(8, 64, 48, dtype=dtype)
            moe_triton.fused_moe(x, w13, w2, *moe.softmax_topk(torch.randn(t, 8), 2, renormalize=False))
            # gpt-oss: a bias in each GEMM and the clamped SwiGLU
            moe_triton.fused_moe(x, w13, w2, *moe.topk_softmax(torch.randn(t, 8), 2), torch.randn(8, 96, dtype=dtype),
                                 torch.randn(8, 64, dtype=dtype), moe.GatedActivation("swigluoai"))
    assert {sig[1] for sig in launches.values()} == {"_grouped_mm_kernel", "_silu_and_mul_kernel",
                                                     "_swiglu_oai_kernel"}
    _compile_for_sm90(launches)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on random bf16 inputs
def test_attention_kernels_compile_for_hopper_at_deepseek_v3s_latent_shape(launches):
    """MLA runs the paged kernels as multi-query attention over one cached row of 512 + 64, 128 query
    heads per KV head (the prefill kernel takes one head per program, so fewer heads compile the same
    code). Every kernel must also fit sm_90's shared memory (checked for every compile here)."""
    pytest.importorskip("triton.backends.nvidia")
    tables = torch.arange(8, dtype=torch.int64).view(2, 4)
    latent = torch.randn(8, 16, 1, 576).to(torch.bfloat16)
    tri.paged_decode_attention(torch.randn(2, 128, 576, dtype=torch.bfloat16), latent, latent, tables,
                               torch.tensor([40, 9]), 0.1)
    for q_len in (7, 40):  # short and long chunks take different row tiles for narrower heads
        tri.paged_prefill_attention_varlen(torch.randn(q_len + 5, 16, 576, dtype=torch.bfloat16), latent, latent,
                                           tables, torch.tensor([0, 5, q_len + 5], dtype=torch.int32),
                                           torch.tensor([30, max(q_len, 30)], dtype=torch.int32), 0.1)
    assert {sig[1] for sig in launches.values()} == {"_decode_split_kernel", "_decode_reduce_kernel", "_prefill_kernel"}
    _compile_for_sm90(launches)
