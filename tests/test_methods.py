"""The method registry: each method is one object, and the CLI, ``dgq compare`` and ``dgq.quantize`` take their
choices and rules from it (no method names compared anywhere else)."""

import pytest
import torch

import dgq
from dgq import DGQConfig, DGQError, methods
from dgq.cli import build_parser
from dgq.compare import parse_methods
from dgq.formats import FORMATS, W8A8Linear
from dgq.quant.peers import w8_rtn
from tiny import make_tiny


class ToyW8(methods.Method):
    """The smallest possible method, defined here the way a method module defines one."""

    name = "toy-w8"
    summary = "per-channel absmax int8 weights, data-free"
    formats = ("w8a8",)
    calibrated = False

    def make_layers(self, lin, name, group_size, stats, config):
        bias = None if lin.bias is None else lin.bias.detach().clone()
        return [W8A8Linear.from_weight(w8_rtn(lin.weight.detach()), bias, config.act_mode, None, name)]


def test_registered_methods_are_well_formed():
    assert methods.names() == ["rtn", "smoothquant", "gptq", "awq", "dgq", "dgq-gptq"]
    for name in methods.names():
        m = methods.get(name)
        assert m.name == name and m.summary and set(m.formats) <= set(FORMATS)
        cfg = methods.resolve(DGQConfig(method=name, group_size=32))
        assert cfg.format == m.formats[0] and methods.resolve(cfg) == cfg  # resolving twice changes nothing
    with pytest.raises(DGQError, match="unknown method 'nope'; choose one of: rtn, smoothquant"):
        methods.get("nope")


def test_a_new_method_needs_only_its_own_object(monkeypatch, tmp_path):
    monkeypatch.setitem(methods.REGISTRY, "toy-w8", ToyW8())
    assert build_parser().parse_args(["quantize", "m", "--out", "o", "--method", "toy-w8"]).method == "toy-w8"
    (row, cfg), = parse_methods("toy-w8", {"group_size": 32})
    assert row == "toy-w8" and cfg.format == "w8a8" and cfg.bits == (8, 8)
    m = make_tiny("llama")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    dgq.quantize(m, cfg, progress=False)
    assert {type(q) for q in m.modules() if isinstance(q, dgq.formats.QuantLinear)} == {W8A8Linear}
    dgq.save(m, tmp_path / "toy")
    back = dgq.load(tmp_path / "toy")
    assert back.dgq_config["method"] == "toy-w8"
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)
    with pytest.raises(DGQError, match="static activation scales needs calibration data"):
        dgq.quantize(make_tiny("llama"), DGQConfig(method="toy-w8", act="static"), progress=False)


def test_quantize_seqlen_is_an_alias_of_calib_seqlen():
    p = build_parser()
    assert p.parse_args(["quantize", "m", "--out", "o"]).calib_seqlen == 512
    assert p.parse_args(["quantize", "m", "--out", "o", "--seqlen", "64"]).calib_seqlen == 64
    assert p.parse_args(["quantize", "m", "--out", "o", "--calib-seqlen", "96"]).calib_seqlen == 96
    assert p.parse_args(["compare", "m", "--out", "o", "--calib-seqlen", "96"]).calib_seqlen == 96
