import pytest
import torch

from dgq import DGQError, DGQLinear
from dgq.kernels import by_name, explain, select
from dgq.kernels.reference import int32_accumulate
from dgq.formats.act import quantize_per_token
from dgq.quant.rtn import rtn_quantize


def make_layer(n, k, g, bias=True, act_mode="dynamic", gen=None, act_scale=None):
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0, 0] = 0.7  # an outlier
    qw = rtn_quantize(w, g)
    b = torch.randn(n, generator=gen) if bias else None
    return DGQLinear.from_tensors(qw.qweight, qw.zeros, qw.scales, qw.channel_scale, g, bias=b,
                                  act_mode=act_mode, act_scale=act_scale), w


@pytest.mark.parametrize("m", [1, 3, 16, 67, 128])
@pytest.mark.parametrize("n,k,g", [(48, 64, 32), (96, 256, 64), (40, 384, 128)])
def test_cpu_int_mm_matches_reference(m, n, k, g, rng):
    layer, _ = make_layer(n, k, g, gen=rng)
    x = torch.randn(m, k, generator=rng) * 3
    ref = by_name("reference").forward(layer, x)
    fast = by_name("cpu-int-mm").forward(layer, x)
    x8, _ = quantize_per_token(x)
    w8t = by_name("cpu-int-mm").weight_t(layer)
    assert torch.equal(torch._int_mm(x8, w8t), int32_accumulate(x8, w8t.t()))
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)


def test_static_mode_and_weights_only(rng):
    layer, w = make_layer(32, 64, 32, act_mode="static", act_scale=0.05, gen=rng)
    x = torch.randn(5, 64, generator=rng)
    torch.testing.assert_close(layer(x), by_name("reference").forward(layer, x), rtol=1e-6, atol=1e-6)
    wo, _ = make_layer(32, 64, 32, act_mode="none", gen=rng)
    assert select(wo, x).name == "weight-only"
    y = wo(x)
    torch.testing.assert_close(y, x @ wo.dequantized_weight().T + wo.bias)


def test_a8w4_close_to_float(rng):
    layer, w = make_layer(64, 256, 64, bias=False, gen=rng)
    x = torch.randn(8, 256, generator=rng)
    y = layer(x)
    yf = x @ w.T
    assert ((y - yf).norm() / yf.norm()).item() < 0.12


def test_never_modifies_input_and_keeps_dtype_and_shape(rng):
    layer, _ = make_layer(32, 64, 32, gen=rng)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 64, generator=rng).to(dtype)
        before = x.clone()
        y = layer(x)
        assert torch.equal(x, before)
        assert y.shape == (2, 3, 32) and y.dtype == dtype


def test_dispatch_explains_and_forced_kernel(rng, monkeypatch):
    layer, _ = make_layer(32, 64, 32, gen=rng)
    x = torch.randn(2, 64, generator=rng)
    assert select(layer, x).name == "cpu-int-mm"
    text = explain(layer, x)
    assert "weight-only: refuses - layer quantizes its activations" in text
    assert "cpu-int-mm: ok" in text
    monkeypatch.setenv("DGQ_KERNEL", "reference")
    assert select(layer, x).name == "reference"
    monkeypatch.setenv("DGQ_KERNEL", "weight-only")
    with pytest.raises(DGQError, match="cannot run DGQLinear.*layer quantizes its activations"):
        select(layer, x)
    monkeypatch.setenv("DGQ_KERNEL", "nope")
    with pytest.raises(DGQError, match="unknown kernel 'nope'"):
        select(layer, x)


def test_zero_rows_are_finite(rng):
    layer, _ = make_layer(32, 64, 32, gen=rng)
    x = torch.zeros(3, 64)
    assert torch.isfinite(layer(x)).all()
