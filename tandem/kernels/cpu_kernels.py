"""tandem's C++ CPU kernels (``csrc/``), loaded as ``torch.ops.tandem_cpu``: the paged decode
attention that reads each sequence's K/V blocks where they lie in the cache instead of gathering
them into a copy, and the per-token ops of a layer in one pass each (RMSNorm, residual add +
RMSNorm, SiLU-and-mul, rotary fused with the KV-cache write), with the torch references'
signatures (``cpu_ops()`` is their ``Ops`` set); and the weight-only int8 linear product that the
``int8`` precision scheme runs on a CPU; and the sampler's draw (temperature, min-p and the
exponential race) in one pass per row.

They are compiled once per machine with torch's extension builder (``make install`` runs
``python -m tandem.kernels.cpu_kernels``), for the vector instructions torch itself selected on
this CPU (AVX-512, AVX2 or none). Where they cannot be built (no C++ compiler) the torch
references serve instead; ``available()`` says which.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tandem.kernels.ops import Ops
from tandem.kernels.paged_attention import Scale
from tandem.kernels.sampling import sample_ref

logger = logging.getLogger(__name__)

_SOURCES = sorted((Path(__file__).parent / "csrc").glob("cpu_*.cpp"))
# Per torch CPU capability: the instruction-set flags and ATen's vector-width macros, so the build
# targets the same vector code torch's own kernels dispatch to on this CPU
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mfma", "-mavx2", "-mf16c",
                         "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
              "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]}


def _capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return "AVX512" if cap.startswith("AVX512") else cap if cap in _ISA_FLAGS else "DEFAULT"


def _build_spec() -> tuple[str, list[str], Path]:
    """(library name, compiler flags, build directory). The name carries a digest of the sources,
    the flags and the torch version, so a built library is reused exactly while all are unchanged."""
    cap = _capability()
    flags = ["-O3", "-fopenmp", *_ISA_FLAGS.get(cap, ["-DCPU_CAPABILITY=DEFAULT"])]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES) +
                            " ".join([*flags, torch.__version__]).encode()).hexdigest()[:12]
    name = f"tandem_cpu_kernels_{cap.lower()}_{digest}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return name, flags, root / "tandem" / name


STALE_LOCK_S = 600.0  # a build lock older than this was left by a killed build


def _build(name: str, flags: list[str], build_dir: Path) -> None:
    """Compiles and links under torch's builder lock (concurrent processes build once)."""
    from torch.utils import cpp_extension

    logger.info("building tandem's CPU kernels in %s (once per machine)", build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        logger.warning("removing a stale build lock %s", lock)
        lock.unlink(missing_ok=True)
    cpp_extension.load(name=name, sources=[str(p) for p in _SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                       build_directory=str(build_dir), is_python_module=False, verbose=False)


@functools.cache
def available() -> bool:
    """Loads the operators, building them first if this machine has no build of the current
    sources (under the builder's file lock, so concurrent processes build once); False, with a
    warning, when that fails."""
    name, flags, build_dir = _build_spec()
    library, built = build_dir / f"{name}.so", build_dir / f"{name}.ok"
    try:
        if not built.exists():  # the marker is written only after a whole build (a linker writes in place)
            _build(name, flags, build_dir)
            built.touch()
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as exc:  # no compiler/ninja, failed build
        logger.warning("tandem's CPU kernels unavailable (%s); using the torch references", exc)
        return False
    return True


def _ops() -> object:
    if not available():
        raise RuntimeError("tandem's CPU kernels could not be built here")
    return torch.ops.tandem_cpu


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, k_scale: Scale = 1.0,
                           v_scale: Scale = 1.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """As ``tandem.kernels.paged_attention.paged_decode_attention`` (same arguments and result);
    a sequence of context length 0 gets zeros. An FP8 cache is read with k_scale / v_scale."""
    sinks = sinks.float().contiguous() if sinks is not None else None
    return _ops().paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens,  # type: ignore[attr-defined]
                                         scale, sliding_window or 0, float(k_scale), float(v_scale), sinks)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _ops().rms_norm(x.contiguous(), weight, eps)  # type: ignore[attr-defined]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(residual + x), residual + x)."""
    return _ops().add_rms_norm(x.contiguous(), residual.contiguous(), weight, eps)  # type: ignore[attr-defined]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _ops().silu_and_mul(x.contiguous())  # type: ignore[attr-defined]


def rope_and_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: Scale = 1.0,
                      v_scale: Scale = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``tandem.kernels.rope_kv.rope_and_write_kv_ref``; q and k may be views into the QKV output."""
    return _ops().rope_and_write_kv(positions, q, k, v, cos, sin, k_cache, v_cache,  # type: ignore[attr-defined]
                                    slot_mapping, float(k_scale), float(v_scale))


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """As ``tandem.kernels.quant.int8_linear_ref`` (x [..., K] in any float type, computed in fp32,
    returned in x's dtype)."""
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    out = _ops().int8_linear(x2, q, scale, b)  # type: ignore[attr-defined]
    return out.to(x.dtype).view(*x.shape[:-1], q.shape[0])


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """As ``tandem.kernels.sampling.sample_ref`` (same arguments; its ids but for scores tied to the
    last bit, see csrc/cpu_sampling.cpp): one C++ pass per row; rows with top-k or top-p are then
    drawn again by the reference (the C++ pass over them is cheaper than splitting the batch)."""
    out = _ops().sample_race(logits, temperature.float().contiguous(), min_p.float().contiguous(),  # type: ignore[attr-defined]
                             noise.contiguous())
    filtered = ((top_k > 0) & (top_k < logits.shape[1])) | (top_p < 1)
    if bool(filtered.any()):
        rows = filtered.nonzero().squeeze(1)
        out[rows] = sample_ref(logits[rows], temperature[rows], top_k[rows], top_p[rows], min_p[rows], noise[rows])
    return out


def cpu_ops() -> Ops:
    return Ops(rms_norm, add_rms_norm, silu_and_mul, rope_and_write_kv)


if __name__ == "__main__":
    sys.exit(0 if available() else 1)
