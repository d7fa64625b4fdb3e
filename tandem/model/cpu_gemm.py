"""Which GEMM each fp32 or bf16 linear layer uses on a CPU, chosen by measuring this machine at load.

torch's default (MKL or OpenBLAS) is fast on some CPUs and repacks the weight on every small
call; oneDNN with the weight packed once (``torch.ops.mkldnn._reorder_linear_weight``, stock
torch) is faster on others, and which wins depends on the weight's shape and the number of rows.
So nothing is hard-coded per CPU model: ``plan_cpu_gemm`` times both on every distinct weight
shape at a few row counts (``PROBE_ROWS``) and gives each layer a ``GemmRoute`` that says, per
row count, which one to call. bf16 weights are packed too where the CPU multiplies bf16 natively
(AVX512-BF16, AMX): 10-25% faster than F.linear's unpacked bf16 at 1-40 rows on a 2-core EPYC.
NOTE: both compute the same product to float32 rounding (about 1e-6 apart; bf16 results to bf16
rounding); the greedy parity tests run with each forced (``cpu_gemm="blas"`` / ``"onednn"``).
"""

from __future__ import annotations

import bisect
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tandem.model.layers import Linear, VocabEmbedding
    from tandem.model.moe import FusedExperts

logger = logging.getLogger(__name__)

CPU_GEMMS = ("auto", "blas", "onednn")
PROBE_ROWS = (1, 8, 32, 128, 512)
# rows up to BUCKET_LIMITS[i] take PROBE_ROWS[i]'s choice (geometric midpoints); more: the last
BUCKET_LIMITS = (2, 16, 64, 256)
ONEDNN_MARGIN = 0.95  # oneDNN is chosen where it takes under 95% of the default's time


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes oneDNN multiplies natively here: fp32 always, bf16 where the CPU has bf16
    instructions (AVX512-BF16 or AMX; elsewhere oneDNN would emulate it)."""
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


@dataclass
class GemmRoute:
    """A weight packed for oneDNN and, per row bucket, whether to use it (else torch's default)."""
    packed: torch.Tensor
    use_onednn: tuple[bool, ...]  # one per PROBE_ROWS

    def wants_onednn(self, rows: int) -> bool:
        return self.use_onednn[bisect.bisect_left(BUCKET_LIMITS, rows)]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def measure_shape(weight: torch.Tensor, default: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  packed: torch.Tensor, repeats: int = 3) -> tuple[bool, ...]:
    """Per probe row count: True where packed oneDNN beats ``default(x, weight)`` by the margin."""
    choice = []
    for rows in PROBE_ROWS:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
        onednn = functools.partial(torch.ops.mkldnn._linear_pointwise, x, packed, None, "none", [], "")
        blas = functools.partial(default, x, weight)
        onednn(), blas()  # warm both (first calls allocate)
        reps = repeats if rows < 256 else max(1, repeats - 1)
        choice.append(best_ms(onednn, reps) < ONEDNN_MARGIN * best_ms(blas, reps))
    return tuple(choice)


def linear_weights(model: object) -> list[Linear | VocabEmbedding]:
    """Modules whose ``weight`` [out, in] is used as a linear map and that take a ``gemm_route``:
    every Linear and, for the logits, the model's ``lm_head``."""
    from tandem.model.layers import Linear, VocabEmbedding

    assert isinstance(model, nn.Module)
    found: list[Linear | VocabEmbedding] = [m for m in model.modules() if isinstance(m, Linear)]
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, VocabEmbedding):
        found.append(lm_head)
    return found


def plan_cpu_gemm(model: object, mode: str) -> dict[tuple[int, int], tuple[bool, ...]]:
    """Give each fp32 (and, where ``packable_dtypes`` has it, bf16) CPU linear weight its GemmRoute
    (``mode``: auto measures, onednn forces it, blas leaves torch's default). Returns the choice per
    weight shape (for logs and benchmarks; one model has one weight dtype)."""
    from tandem.model.layers import linear

    if mode not in CPU_GEMMS:
        raise ValueError(f"cpu_gemm must be one of {CPU_GEMMS}, got {mode!r}")
    if mode == "blas" or not onednn_available():
        return {}
    choices: dict[tuple[int, int], tuple[bool, ...]] = {}
    dtypes = packable_dtypes()
    with torch.no_grad():
        for module in linear_weights(model):
            weight = module.weight
            if module.quant is not None:
                continue  # its product is the quantized weight's (tandem/quantization)
            if weight.device.type != "cpu" or weight.dtype not in dtypes or weight.dim() != 2:
                continue
            shape = (weight.shape[0], weight.shape[1])
            if shape in choices and not any(choices[shape]):
                continue  # the default wins at every row count: nothing to pack
            packed = pack(weight)
            if shape not in choices:
                choices[shape] = (True,) * len(PROBE_ROWS) if mode == "onednn" else measure_shape(weight, linear, packed)
            if any(choices[shape]):
                module.gemm_route = GemmRoute(packed, choices[shape])
        for experts in expert_modules(model):
            _plan_experts(experts, mode, dtypes, choices)
    logger.info("cpu gemm (%s): oneDNN per probe rows %s by weight shape: %s", mode, PROBE_ROWS, choices)
    return choices


def expert_modules(model: object) -> list[FusedExperts]:
    from tandem.model.moe import FusedExperts

    assert isinstance(model, nn.Module)
    return [m for m in model.modules() if isinstance(m, FusedExperts)]


def _plan_experts(experts: FusedExperts, mode: str, dtypes: tuple[torch.dtype, ...],
                  choices: dict[tuple[int, int], tuple[bool, ...]]) -> None:
    """Fused experts [E, out, in] as E linear weights of one shape each for gate/up and down:
    measured once per shape on expert 0, then every expert packed where oneDNN wins."""
    from tandem.model.layers import linear

    weights = (experts.gate_up_proj, experts.down_proj)
    if any(w.device.type != "cpu" or w.dtype not in dtypes for w in weights):
        return
    for w in weights:
        shape = (w.shape[1], w.shape[2])
        if shape not in choices:
            choices[shape] = (True,) * len(PROBE_ROWS) if mode == "onednn" else measure_shape(w[0], linear, pack(w[0]))
    if not any(any(choices[(w.shape[1], w.shape[2])]) for w in weights):
        return  # the default wins everywhere: nothing to pack
    gate_up, down = ([GemmRoute(pack(w[e]), choices[(w.shape[1], w.shape[2])]) for e in range(w.shape[0])]
                     for w in weights)
    experts.gemm_routes = (gate_up, down)
    # NOTE: the float weights stay for the row counts where the BLAS won: the packed copies add as much
    logger.debug("packed %d experts for oneDNN: +%.1f MiB", len(gate_up),
                 sum(w.numel() * w.element_size() for w in weights) / 2**20)
