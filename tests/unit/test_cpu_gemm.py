"""The CPU GEMM choice (tandem/model/cpu_gemm.py): oneDNN with packed weights gives F.linear's
result; the choice per row count follows the measurement, not the CPU model; without oneDNN, or
with cpu_gemm blas, every layer keeps torch's default."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tandem.model import cpu_gemm
from tandem.model.cpu_gemm import PROBE_ROWS, GemmRoute, measure_shape, pack, plan_cpu_gemm
from tandem.model.layers import Linear, ShardedLinear, VocabEmbedding

pytestmark = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this torch has no oneDNN")


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = ShardedLinear(48, {"gate": 64, "up": 64}, bias=True, dtype=torch.float32)
        self.down = Linear(128, 48, bias=False, dtype=torch.float32)
        self.lm_head = VocabEmbedding(200, 48, torch.float32)
        g = torch.Generator().manual_seed(0)
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64, 300])
def test_packed_onednn_gives_f_linears_result(rows):
    model = TwoLayers()
    assert plan_cpu_gemm(model, "onednn") == {(128, 48): (True,) * 5, (48, 128): (True,) * 5, (200, 48): (True,) * 5}
    x = torch.randn(rows, 48)
    up = model.up(x)
    torch.testing.assert_close(up, F.linear(x, model.up.weight, model.up.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.down(up), F.linear(up, model.down.weight), rtol=1e-5, atol=1e-5)
    assert model.lm_head.gemm_route is not None and model.lm_head.gemm_route.wants_onednn(rows)


@pytest.mark.skipif(torch.bfloat16 not in cpu_gemm.packable_dtypes(), reason="no native bf16 in oneDNN here")
@pytest.mark.parametrize("rows", [1, 17, 300])
def test_bf16_weights_are_packed_where_the_cpu_has_bf16(rows):
    model = TwoLayers().to(torch.bfloat16)
    assert plan_cpu_gemm(model, "onednn")[(48, 128)] == (True,) * 5
    x = torch.randn(rows, 128).to(torch.bfloat16)
    got = model.down(x)
    assert got.dtype == torch.bfloat16
    # fp32 accumulation in both, then one bf16 rounding of the result
    torch.testing.assert_close(got, F.linear(x, model.down.weight), rtol=1.6e-2, atol=1e-2)


def test_other_dtypes_keep_the_default(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert plan_cpu_gemm(TwoLayers().to(torch.bfloat16), "onednn") == {}
    assert plan_cpu_gemm(TwoLayers().to(torch.float16), "onednn") == {}


def test_the_route_is_chosen_per_row_bucket():
    route = GemmRoute(pack(torch.randn(8, 4)), (False, True, True, False, True))
    assert [route.wants_onednn(r) for r in (1, 2, 3, 16, 17, 64, 65, 256, 257, 4096)] == \
        [False, False, True, True, True, True, False, False, True, True]


def test_auto_follows_the_measurement():
    weight = torch.randn(32, 16)
    packed = pack(weight)

    def slow_default(x, w):
        time.sleep(0.002)
        return F.linear(x, w)

    assert measure_shape(weight, slow_default, packed) == (True,) * len(PROBE_ROWS)
    instant = {rows: torch.zeros(rows, 32) for rows in PROBE_ROWS}
    assert measure_shape(weight, lambda x, w: instant[x.shape[0]], packed) == (False,) * len(PROBE_ROWS)


def test_blas_or_no_onednn_leaves_the_default(monkeypatch):
    model = TwoLayers()
    assert plan_cpu_gemm(model, "blas") == {}
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert plan_cpu_gemm(model, "auto") == {} and plan_cpu_gemm(model, "onednn") == {}
    assert model.up.gemm_route is None and model.down.gemm_route is None and model.lm_head.gemm_route is None
    with pytest.raises(ValueError, match="cpu_gemm"):
        plan_cpu_gemm(model, "mkl")
