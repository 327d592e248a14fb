"""The quantizers are device-agnostic tensor code: every tensor they create lands on their input's device, so
calibration runs on the device the block was onloaded to (``--device cuda``) with no host round trips. Checked
without a GPU: under ``torch.device("meta")`` as the default device, a tensor created without ``device=`` would be
a meta tensor and the next operation mixing it with the CPU inputs fails; results must equal the normal run's."""

import pytest
import torch

from dgq.quant.awq import awq_clip, awq_scales
from dgq.quant.gptq import Grid, gptq_quantize
from dgq.quant.search import default_grid1, default_grid2, dgq_search, phase1


@pytest.fixture
def wh():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g) * 0.02
    x = torch.randn(512, 256, generator=g)
    x[:, 3] *= 30  # an outlier channel
    return w, x.T @ x / 512, x


def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert a.device.type == "cpu" and torch.equal(a, b)
    else:
        for f in ("qweight", "zeros", "scales", "channel_scale"):
            _same(getattr(a, f), getattr(b, f))


@pytest.mark.parametrize("phase2", [True, False])
def test_dgq_search_creates_tensors_on_the_input_device(wh, phase2):
    w, h, _ = wh
    grids = dict(grid1=default_grid1(8), grid2=default_grid2(16))
    ref = dgq_search(w, h, 64, phase2_enabled=phase2, **grids)
    with torch.device("meta"):
        _same(dgq_search(w, h, 64, phase2_enabled=phase2, **grids), ref)
        _same(phase1(w, h, 64, grids["grid1"])[0], phase1(w, h, 64, grids["grid1"])[0])


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_creates_tensors_on_the_input_device(wh, act_order):
    w, h, _ = wh
    grid = Grid(torch.full((48, 4), 0.004), torch.full((48, 4), 8.0), torch.zeros(48, 4), torch.full((48, 4), 15.0))
    ref = gptq_quantize(w, h, 64, static=grid, act_order=act_order)[0]
    with torch.device("meta"):
        _same(gptq_quantize(w, h, 64, static=grid, act_order=act_order)[0], ref)

    def find(wg):
        lo, hi = wg.amin(1), wg.amax(1)
        step = ((hi - lo) / 15).clamp_min(1e-8)
        return step, torch.round(-lo / step), torch.zeros_like(lo), torch.full_like(lo, 15.0)

    ref = gptq_quantize(w, h, 64, find=find)[0]
    with torch.device("meta"):
        _same(gptq_quantize(w, h, 64, find=find)[0], ref)


def test_awq_creates_tensors_on_the_input_device(wh):
    w, h, x = wh
    ref_clip = awq_clip(w, h, 64, grid=10)
    ref_s = awq_scales(x.abs().mean(0), h, [w], 64, grid=5)[0]
    with torch.device("meta"):
        _same(awq_clip(w, h, 64, grid=10), ref_clip)
        _same(awq_scales(x.abs().mean(0), h, [w], 64, grid=5)[0], ref_s)
