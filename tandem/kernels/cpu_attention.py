"""The CPU paged decode attention (``csrc/cpu_paged_attention.cpp``): a C++ operator that reads each
sequence's K/V blocks where they lie in the cache instead of gathering them into a copy first.

It is compiled once per machine with torch's extension builder (``make install`` runs
``python -m tandem.kernels.cpu_attention``), for the vector instructions torch itself selected on
this CPU (AVX-512, AVX2 or none), and loaded as ``torch.ops.tandem_cpu``. Where it cannot be built
(no C++ compiler) the torch reference (gather + SDPA) serves instead; ``available()`` says which.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_paged_attention.cpp"
# Per torch CPU capability: the instruction-set flags and ATen's vector-width macros, so the build
# targets the same vector code torch's own kernels dispatch to on this CPU
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mfma", "-mavx2", "-mf16c",
                         "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
              "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]}


def _capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return "AVX512" if cap.startswith("AVX512") else cap if cap in _ISA_FLAGS else "DEFAULT"


def _build_spec() -> tuple[str, list[str], Path]:
    """(library name, compiler flags, build directory). The name carries a digest of the source, the
    flags and the torch version, so a built library is reused exactly while all three are unchanged."""
    cap = _capability()
    flags = ["-O3", "-fopenmp", "-std=c++17", *_ISA_FLAGS.get(cap, ["-DCPU_CAPABILITY=DEFAULT"])]
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join([*flags, torch.__version__]).encode()).hexdigest()[:12]
    name = f"tandem_cpu_attention_{cap.lower()}_{digest}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return name, flags, root / "tandem" / name


@functools.cache
def available() -> bool:
    """Loads the operator, building it first if this machine has no build of the current source
    (under the builder's file lock, so concurrent processes build once); False, with a warning,
    when that fails."""
    name, flags, build_dir = _build_spec()
    library = build_dir / f"{name}.so"
    try:
        if not library.exists():
            from torch.utils import cpp_extension

            logger.info("building the CPU paged attention operator in %s (once per machine)", build_dir)
            build_dir.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                               build_directory=str(build_dir), is_python_module=False, verbose=False)
        else:
            torch.ops.load_library(str(library))
    except (OSError, RuntimeError, ImportError) as exc:  # no compiler / ninja, or the build failed
        logger.warning("CPU paged attention unavailable (%s); using the torch reference", exc)
        return False
    return True


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """As ``tandem.kernels.paged_attention.paged_decode_attention`` (same arguments and result);
    a sequence of context length 0 gets zeros."""
    if not available():
        raise RuntimeError("the CPU paged attention operator could not be built here")
    return torch.ops.tandem_cpu.paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale,
                                                       sliding_window or 0)


if __name__ == "__main__":
    sys.exit(0 if available() else 1)
