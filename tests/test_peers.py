"""Peer methods in the same harness: GPTQ, AWQ, SmoothQuant, RTN variants, and DGQ+GPTQ."""

import pytest
import torch

import dgq
from dgq import DGQConfig, DGQError
from dgq.formats import DGQLinear, W4A16Linear, W8A8Linear
from dgq.formats import dgq as fmt
from dgq.formats.packing import unpack_uint4
from dgq.formats.w4a16 import dequantize as w4_dequantize
from dgq.methods import resolve
from dgq.methods.dgq_gptq import dgq_gptq_weight
from dgq.methods.gptq import gptq_w4_weight
from dgq.quant.awq import awq_clip, awq_scales
from dgq.quant.gptq import gptq_quantize
from dgq.quant.peers import w4_fake, w4_rtn, w8_rtn
from dgq.quant.search import hessian
from dgq.quant.smooth import smoothquant_factors
from tiny import make_tiny


def _correlated(rng, t=2048, k=256, n=96):
    """Inputs with strongly correlated channels and a few large ones, and a weight (what makes GPTQ matter)."""
    base = torch.randn(t, k // 8, generator=rng)
    x = base.repeat_interleave(8, 1) + 0.3 * torch.randn(t, k, generator=rng)
    x[:, :4] *= 8
    w = torch.randn(n, k, generator=rng) * 0.05
    return x, w


def _out_err(x, w, w_hat):
    return (x @ w.T - x @ w_hat.T).norm().item()


def test_w4_roundtrip_and_range(rng):
    w = torch.randn(64, 128, generator=rng)
    q = w4_rtn(w, 64)
    assert q.scales.dtype == torch.float16 and int(q.zeros.max()) <= 15
    w_hat = q.dequantize()
    torch.testing.assert_close(w_hat, w4_fake(w, 64))
    step = q.scales.float().repeat_interleave(64, 1)
    # the integer zero shifts the min/max grid by up to half a step, so the extremes may be one step off
    assert bool(((w - w_hat).abs() <= step + 1e-6).all())
    assert ((w - w_hat).abs() <= step / 2 + 1e-6).float().mean() > 0.9


def test_w8_per_channel(rng):
    w = torch.randn(32, 48, generator=rng)
    q = w8_rtn(w)
    assert int(q.weight.abs().max()) <= 127
    assert ((q.dequantize() - w).abs().amax(1) <= q.scale / 2 + 1e-7).all()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(rng, act_order):
    x, w = _correlated(rng)
    h = hessian(x)
    cfg = DGQConfig(method="gptq", group_size=64, act_order=act_order)
    gq = gptq_w4_weight(w, h, 64, cfg)
    rtn = w4_rtn(w, 64)
    assert _out_err(x, w, gq.dequantize()) < 0.8 * _out_err(x, w, rtn.dequantize())


def test_gptq_with_identity_hessian_is_rtn(rng):
    """With H = I there is nothing to compensate: GPTQ's codes are RTN's."""
    w = torch.randn(16, 128, generator=rng)
    from dgq.quant.peers import w4_params

    def find(wg):
        s, z = w4_params(wg)
        return s, z, torch.zeros_like(z), torch.full_like(z, 15)

    codes, _ = gptq_quantize(w, torch.eye(128), 64, find=find, damp=1e-6)
    assert torch.equal(codes.to(torch.uint8), unpack_uint4(w4_rtn(w, 64).qweight))


def test_gptq_refuses_bad_hessian():
    with pytest.raises(DGQError, match="positive definite"):
        gptq_quantize(torch.randn(4, 8), -torch.eye(8) * 1e6 + torch.ones(8, 8), 8,
                      find=lambda wg: (torch.ones(4), torch.zeros(4), torch.zeros(4), torch.full((4,), 15.0)))


def test_dgq_gptq_codes_in_int8_safe_range_and_better(rng):
    x, w = _correlated(rng)
    h = hessian(x)
    cfg = DGQConfig(method="dgq-gptq", group_size=64, grid2=8, refine=2)
    qw, plain = dgq_gptq_weight(w, h, 64, cfg)
    lo, hi = fmt.safe_code_bounds(qw.zeros, qw.scales)
    q = unpack_uint4(qw.qweight).view(w.shape[0], -1, 64).int()
    assert bool(((q >= lo[..., None]) & (q <= hi[..., None])).all())
    assert int(fmt.expand_int8(qw.qweight, qw.zeros, qw.scales, 64).abs().max()) <= 127
    assert _out_err(x, w, qw.dequantize()) < 0.9 * _out_err(x, w, plain.dequantize())
    again, same = dgq_gptq_weight(w, h, 64, cfg, qw=plain)  # the search's result handed in: the same weights
    assert same is plain and torch.equal(again.qweight, qw.qweight)


def test_dgq_gptq_rtn_grid_never_worse_per_channel(rng):
    """The RTN-grid candidate only ever lowers a row's ``dᵀ H d``, is off unless asked for, and the
    result stays in the int8-safe range."""
    from dgq.quant.search import output_error

    x, w = _correlated(rng)
    w[:, :8] *= 6.0  # a few wide columns: the search clips groups that GPTQ would rather compensate
    h = hessian(x)
    base = DGQConfig(method="dgq-gptq", group_size=64, grid2=8, refine=2)
    off = resolve(base)
    assert off.rtn_grid is False and resolve(DGQConfig(method="dgq", group_size=64)).rtn_grid is False
    on = resolve(DGQConfig(method="dgq-gptq", group_size=64, grid2=8, refine=2, rtn_grid=True))
    with_rtn, plain = dgq_gptq_weight(w, h, 64, on)
    without, _ = dgq_gptq_weight(w, h, 64, off)
    e_on, e_off = output_error(w, with_rtn.dequantize(), h), output_error(w, without.dequantize(), h)
    assert (e_on <= e_off * (1 + 1e-6)).all() and bool((e_on < e_off * 0.999).any())
    assert int(fmt.expand_int8(with_rtn.qweight, with_rtn.zeros, with_rtn.scales, 64).abs().max()) <= 127
    with pytest.raises(DGQError, match="rtn_grid"):
        resolve(DGQConfig(method="dgq-gptq", rtn_grid="yes"))


def test_awq_scales_and_clip_not_worse_than_rtn(rng):
    x, w = _correlated(rng)
    h = hessian(x)
    s, info = awq_scales(x.abs().mean(0), h, [w], 64, grid=10)
    assert info["error"] <= info["error_alpha0"] and s.shape == (w.shape[1],)
    w_s = w4_fake(w * s, 64) / s
    assert _out_err(x, w, w_s) <= _out_err(x, w, w4_fake(w, 64)) * (1 + 1e-5)
    wc = awq_clip(w, h, 64, grid=10)
    assert _out_err(x, w, w4_fake(wc, 64)) <= _out_err(x, w, w4_fake(w, 64)) * (1 + 1e-5)


def test_smoothquant_factors_balance_ranges():
    a = torch.tensor([100.0, 1.0, 4.0])
    w = torch.tensor([[0.01, 1.0, 0.25]])
    f = smoothquant_factors(a, [w], 0.5)
    torch.testing.assert_close(a / f, w.abs().amax(0) * f)  # α = 0.5: activation and weight ranges meet


def test_w4a16_module_matches_dequantized(rng):
    w = torch.randn(24, 128, generator=rng)
    q = w4_rtn(w, 64)
    m = W4A16Linear.from_weight(q, bias=torch.randn(24, generator=rng))
    x = torch.randn(5, 128, generator=rng)
    torch.testing.assert_close(m(x), x @ w4_dequantize(q.qweight, q.scales, q.zeros, 64).T + m.bias)


def test_w8a8_module_int_mm_equals_reference(rng, monkeypatch):
    w = torch.randn(40, 96, generator=rng)
    m = W8A8Linear.from_weight(w8_rtn(w), bias=torch.randn(40, generator=rng))
    x = torch.randn(7, 96, generator=rng)
    y = m(x)
    assert m.kernel_for(x).name == "cpu-int-mm"
    monkeypatch.setenv("DGQ_KERNEL", "reference")
    assert torch.equal(m(x), y)
    monkeypatch.setenv("DGQ_KERNEL", "triton")
    with pytest.raises(DGQError, match="does not run w8a8"):
        m(x)


CONFIGS = {
    "rtn-w4a16": DGQConfig(method="rtn", group_size=32, weights_only=True),
    "rtn-w8a8": DGQConfig(method="rtn", w_bits=8),
    "smoothquant": DGQConfig(method="smoothquant", w_bits=8),
    "smoothquant-static": DGQConfig(method="smoothquant", w_bits=8, act="static", alpha=0.8),
    "gptq": DGQConfig(method="gptq", group_size=32),
    "gptq-act-order": DGQConfig(method="gptq", group_size=32, act_order=True),
    "awq": DGQConfig(method="awq", group_size=32, awq_grid=5),
    "dgq-gptq": DGQConfig(method="dgq-gptq", group_size=32, grid2=4, refine=1),
}
FORMAT_OF = {"rtn-w4a16": W4A16Linear, "rtn-w8a8": W8A8Linear, "smoothquant": W8A8Linear,
             "smoothquant-static": W8A8Linear, "gptq": W4A16Linear, "gptq-act-order": W4A16Linear,
             "awq": W4A16Linear, "dgq-gptq": DGQLinear}


def test_dgq_gptq_keeps_the_better_block():
    m = make_tiny("llama")
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    dgq.quantize(m, DGQConfig(method="dgq-gptq", group_size=32, grid2=4, refine=1), calib=ids, progress=False)
    for b in m.dgq_config["calibration"]["blocks"]:
        alt = b["alternatives"]
        assert len(alt["token_rel_error"]) == 2
        assert b["block_token_rel_error"] == pytest.approx(min(alt["token_rel_error"]), abs=1e-6)
        assert alt["token_rel_error"][alt["chosen"]] == min(alt["token_rel_error"])


@pytest.mark.parametrize("row", list(CONFIGS))
def test_each_method_quantizes_saves_and_reloads(row, tmp_path):
    m = make_tiny("llama")
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits
    dgq.quantize(m, CONFIGS[row], calib=ids, progress=False)
    kinds = {type(mod) for mod in m.modules() if isinstance(mod, (DGQLinear, W4A16Linear, W8A8Linear))}
    assert kinds == {FORMAT_OF[row]}
    with torch.no_grad():
        out = m(ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.2, rel
    dgq.save(m, tmp_path / row)
    back = dgq.load(tmp_path / row)
    q = back.dgq_config
    assert q["method"] == CONFIGS[row].method and q["format"] == resolve(CONFIGS[row]).format
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out)


def test_method_format_conflicts_are_refused():
    for cfg, msg in [(DGQConfig(method="gptq", w_bits=8), "4-bit weights"),
                     (DGQConfig(method="smoothquant", weights_only=True), "weights_only"),
                     (DGQConfig(method="smoothquant", w_bits=4), "8-bit weights"),
                     (DGQConfig(method="dgq", format="w4a16"), "writes the dgq format"),
                     (DGQConfig(method="gptq", format="dgq"), "writes the w4a16 format"),
                     (DGQConfig(method="smoothquant", alpha=1.5), "alpha")]:
        with pytest.raises(DGQError, match=msg):
            resolve(cfg)


def test_w8a8_ignores_group_size_and_gptq_needs_calib():
    m = make_tiny("llama")
    dgq.quantize(m, DGQConfig(method="rtn", w_bits=8, group_size=48), progress=False)  # 48 divides no K here
    with pytest.raises(DGQError, match="calibration"):
        dgq.quantize(make_tiny("llama"), DGQConfig(method="gptq", group_size=32), progress=False)


def test_parse_methods():
    from dgq.compare import parse_methods

    rows = parse_methods("rtn,smoothquant:alpha=0.8,gptq:act_order=true", {"group_size": 64})
    assert [n for n, _ in rows] == ["rtn-w4a16", "rtn-w4a8", "rtn-w8a8", "smoothquant:alpha=0.8",
                                    "gptq:act_order=true"]
    assert rows[3][1].alpha == 0.8 and rows[4][1].act_order is True and rows[0][1].group_size == 64
    assert [c.format for _, c in rows[:3]] == ["w4a16", "dgq", "w8a8"]
    for bad, msg in [("nope", "unknown method"), ("gptq:foo=1", "unknown option"), ("gptq:damp=x", "needs a float"),
                     ("gptq:act_order", "field=value"), ("smoothquant:alpha=3", "alpha")]:
        with pytest.raises(DGQError, match=msg):
            parse_methods(bad, {})


def test_compare_cli_writes_report(tiny_hf_dir, tmp_path, capsys):
    import json

    from dgq.cli import main

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 50} is number {i}." for i in range(800)))
    out = tmp_path / "cmp"
    rc = main(["compare", str(tiny_hf_dir), "--methods", "rtn-w4a16,smoothquant,gptq,dgq-gptq:grid2=4",
               "--calib", str(text), "--text", str(text), "--out", str(out), "--group-size", "32", "--nsamples", "2",
               "--calib-seqlen", "32", "--seqlen", "64", "--max-tokens", "512"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in doc["results"]}
    assert list(rows) == ["fp", "rtn-w4a16", "smoothquant", "gptq", "dgq-gptq:grid2=4"]
    for r in doc["results"][1:]:
        for k in ("w_bits", "a_bits", "group_size", "ppl", "delta_ppl_pct", "quant_seconds", "peak_rss_mb",
                  "checkpoint_bytes"):
            assert r[k] is not None or (k == "group_size" and r["w_bits"] == 8), (r["method"], k)
        assert r["ppl"] > 1 and r["peak_rss_mb"] > 0 and r["checkpoint_bytes"] > 0
    assert rows["smoothquant"]["w_bits"] == 8 and rows["gptq"]["a_bits"] == 16
    assert rows["dgq-gptq:grid2=4"]["a_bits"] == 8
    assert rows["gptq"]["bits_per_weight"] < rows["smoothquant"]["bits_per_weight"]
    md = (out / "results.md").read_text()
    assert "| gptq | W4A16 | 32 |" in md
    assert (out / "ppl_vs_bits.png").stat().st_size > 1000
    assert not (out / "checkpoints").exists()


def test_compare_resume_adds_only_missing_rows(tiny_hf_dir, tmp_path, capsys):
    """--resume keeps an earlier report's rows (FP not evaluated again) and runs only the methods it lacks; other
    settings, or --force with it, are refused."""
    import json

    from dgq.cli import main

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 50} is number {i}." for i in range(800)))
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_hf_dir), "--calib", str(text), "--text", str(text), "--out", str(out),
            "--group-size", "32", "--nsamples", "2", "--calib-seqlen", "32", "--seqlen", "64", "--max-tokens", "512"]
    assert main(args + ["--methods", "rtn-w4a16"]) == 0, capsys.readouterr().err
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(args + ["--methods", "rtn-w4a16,rtn-w8a8", "--resume"]) == 0, capsys.readouterr().err
    assert "1 to run" in capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in doc["results"]] == ["fp", "rtn-w4a16", "rtn-w8a8"]
    assert doc["results"][:2] == first["results"]  # kept as measured, dates included
    assert doc["results"][2]["date"] and doc["results"][2]["delta_ppl_pct"] == round(
        100 * (doc["results"][2]["ppl"] / doc["results"][0]["ppl"] - 1), 2)
    assert main(args[:-1] + ["256", "--methods", "rtn-w4a8", "--resume"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(args[:8] + ["--group-size", "64"] + args[10:] + ["--methods", "rtn-w4a8", "--resume"]) == 2
    assert "--group-size/--act" in capsys.readouterr().err
    assert main(args + ["--methods", "rtn-w4a8", "--resume", "--force"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == doc  # refusals change nothing


def test_act_order_default_per_method():
    """act-order is dgq-gptq's default (it lowers its perplexity, README); gptq keeps the published default."""
    from dgq.cli import build_parser
    from dgq.compare import parse_methods

    assert resolve(DGQConfig(method="dgq-gptq")).act_order is True
    assert resolve(DGQConfig(method="gptq")).act_order is False
    assert resolve(DGQConfig(method="dgq-gptq", act_order=False)).act_order is False
    assert resolve(DGQConfig(method="gptq", act_order=True)).act_order is True
    with pytest.raises(DGQError, match="act_order"):
        resolve(DGQConfig(act_order="yes"))
    p = build_parser()
    base = ["quantize", "m", "--out", "o"]
    assert p.parse_args(base).act_order is None
    assert p.parse_args(base + ["--no-act-order"]).act_order is False
    assert p.parse_args(base + ["--act-order"]).act_order is True
    assert parse_methods("dgq-gptq:act_order=false", {})[0][1].act_order is False
    # the token-weighted Hessian likewise: dgq-gptq's default, an option for gptq
    assert resolve(DGQConfig(method="dgq-gptq")).token_weighted is True
    assert resolve(DGQConfig(method="gptq")).token_weighted is False
    cfg = parse_methods("gptq:token_weighted=true", {"group_size": 32})[0][1]
    m = make_tiny("llama")
    dgq.quantize(m, cfg, calib=torch.randint(0, 256, (2, 16)), progress=False)
    assert m.dgq_config["recipe"]["token_weighted"] is True


def test_method_spec_ignore_is_a_list_of_exact_module_names():
    """``ignore`` in a method spec is a list (``+``-separated) of exact names. It used to reach DGQConfig as a
    string, so ``name not in ignore`` was a substring test: a mistyped name silently skipped real layers."""
    from dgq.compare import parse_methods
    from dgq.formats import QuantLinear

    spec = "rtn-w4a8:ignore=model.layers.0.mlp.down_proj+model.layers.1.self_attn.q_proj"
    cfg = parse_methods(spec, {"group_size": 32})[0][1]
    assert cfg.ignore == ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj")
    m = make_tiny("llama")
    dgq.quantize(m, cfg, progress=False)
    assert not isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)
    assert not isinstance(m.model.layers[1].self_attn.q_proj, QuantLinear)
    assert isinstance(m.model.layers[1].mlp.down_proj, QuantLinear)
    typo = parse_methods("rtn-w4a8:ignore=xmodel.layers.0.mlp.down_proj", {"group_size": 32})[0][1]
    with pytest.raises(DGQError, match="not a quantizable linear"):
        dgq.quantize(make_tiny("llama"), typo, progress=False)
    with pytest.raises(DGQError, match="sequence of full module names"):
        resolve(DGQConfig(ignore="model.layers.0.mlp.down_proj"))
