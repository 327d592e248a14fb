import pytest
import torch

from dgq import DGQError, DGQLinear
from dgq.formats.act import quantize_per_token
from dgq.kernels import by_name, explain, select
from dgq.kernels.reference import int32_accumulate
from dgq.quant.rtn import rtn_quantize


def make_layer(n, k, g, bias=True, act_mode="dynamic", gen=None, act_scale=None):
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0, 0] = 0.7  # an outlier
    qw = rtn_quantize(w, g)
    b = torch.randn(n, generator=gen) if bias else None
    return DGQLinear.from_weight(qw, b, act_mode, act_scale), w


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
    assert "weight-only: refuses - layer has dynamic int8 activations" in text
    assert "cpu-int-mm: ok" in text
    monkeypatch.setenv("DGQ_KERNEL", "reference")
    assert select(layer, x).name == "reference"
    monkeypatch.setenv("DGQ_KERNEL", "weight-only")
    with pytest.raises(DGQError, match="cannot run DGQLinear.*layer has dynamic int8 activations"):
        select(layer, x)
    monkeypatch.setenv("DGQ_KERNEL", "nope")
    with pytest.raises(DGQError, match="unknown kernel 'nope'"):
        select(layer, x)


def test_zero_rows_are_finite(rng):
    layer, _ = make_layer(32, 64, 32, gen=rng)
    x = torch.zeros(3, 64)
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("forced", ["reference", "cpu-int-mm", "triton"])
def test_forced_kernel_refuses_weight_only_layers(forced, rng, monkeypatch):
    """A kernel forced on a layer it cannot run is an error, never a change of semantics: before the kernels
    declared their activation modes, DGQ_KERNEL=reference quantized a weight-only layer's activations to int8."""
    layer, _ = make_layer(32, 64, 32, act_mode="none", gen=rng)
    x = torch.randn(4, 64, generator=rng)
    monkeypatch.setenv("DGQ_KERNEL", forced)
    with pytest.raises(DGQError, match=f"DGQ_KERNEL={forced} cannot run .*float activations"):
        layer(x)
    monkeypatch.delenv("DGQ_KERNEL")
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T + layer.bias)


def test_forced_kernel_refuses_other_formats(rng, monkeypatch):
    from dgq.formats import W4A16Linear, W8A8Linear
    from dgq.quant.peers import w4_rtn, w8_rtn

    w = torch.randn(32, 64, generator=rng)
    x = torch.randn(2, 64, generator=rng)
    monkeypatch.setenv("DGQ_KERNEL", "weight-only")
    with pytest.raises(DGQError, match="does not run w8a8 layers"):
        W8A8Linear.from_weight(w8_rtn(w))(x)
    monkeypatch.setenv("DGQ_KERNEL", "cpu-int-mm")
    with pytest.raises(DGQError, match="does not run w4a16 layers"):
        W4A16Linear.from_weight(w4_rtn(w, 32))(x)


def test_every_layer_kind_gets_a_kernel_that_declares_it(rng):
    from dgq.formats import FORMATS
    from dgq.kernels import KERNELS, refusal

    x = torch.randn(3, 128, generator=rng)
    for cls in FORMATS.values():
        for mode in cls.act_modes:
            layer = cls(128, 16, 64, act_mode=mode)
            k = select(layer, x)
            assert layer.format in k.formats and mode in k.act_modes
            for other in KERNELS:  # a kernel that declares neither the format nor the mode always refuses
                if layer.format not in other.formats or mode not in other.act_modes:
                    assert refusal(other, layer, x) is not None


def test_quantize_warns_when_a_group_size_has_no_fast_gpu_kernel(caplog):
    import dgq
    from tiny import make_tiny

    with caplog.at_level("WARNING", logger="dgq"):
        dgq.quantize(make_tiny("llama", hidden_size=128, intermediate_size=256), dgq.DGQConfig(group_size=32),
                     progress=False)
    assert "group size 32 is not 64, 128 or 256" in caplog.text and "14 quantized layer(s)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dgq"):
        dgq.quantize(make_tiny("llama", hidden_size=128, intermediate_size=256), dgq.DGQConfig(group_size=64),
                     progress=False)
    assert "no fast GPU kernel" not in caplog.text


@pytest.mark.parametrize("strategy", ["int_mm", "fp32-exact"])
@pytest.mark.parametrize("k", [64, 1024, 2304])
def test_cpu_strategies_are_exact(strategy, k, rng, monkeypatch):
    """Both CPU int32 products are bitwise the reference, at the extremes (±127 everywhere, K past one chunk)."""
    from dgq.kernels.cpu import CpuIntMMKernel

    monkeypatch.setenv("DGQ_CPU_INT8", strategy)
    kern = CpuIntMMKernel()
    assert kern.strategy == strategy
    layer, _ = make_layer(48, k, 64, gen=rng)
    x = torch.randn(5, k, generator=rng)
    x[0] = 3.0  # a row that quantizes to +127 everywhere
    x8, _ = quantize_per_token(x)
    w8 = layer.int8_weight()
    assert torch.equal(kern.int32_product(layer, x8), int32_accumulate(x8, w8))
    big = torch.full((2, k), 127, dtype=torch.int8)
    big[1] = -127
    worst = DGQLinear(k, 3, 64)  # all-zero codes and zero point 15 with s_int 8: every weight -120
    worst.zeros.fill_(15)
    worst.scales.fill_(8)
    assert torch.equal(kern.int32_product(worst, big), int32_accumulate(big, worst.int8_weight()))
    torch.testing.assert_close(kern.forward(layer, x), by_name("reference").forward(layer, x), rtol=0, atol=0)
