"""dgq export to compressed-tensors, checked with the target's own library: compressed-tensors' config model accepts
the config, transformers' compressed-tensors loader reads the folder, its weights are dgq's dequantized weights
(bitwise for ct-w8a8; within the scale rounding for ct-w4a16), a tampered export is refused by the target library,
and what the target cannot hold is refused by dgq before anything is written."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dgq
from dgq import DGQConfig, DGQError
from dgq.arch import set_submodule
from dgq.cli import main
from dgq.export.ct import pack_int4_codes
from dgq.formats import QuantLinear
from tiny import make_tiny, tokenizer

ct_lib = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils.quantization_config import CompressedTensorsConfig  # noqa: E402

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
IDS = torch.randint(1, 256, (2, 11), generator=torch.Generator().manual_seed(1))
# family, recipe, dtype: every dgq storage format and activation mode; Qwen2 has q/k/v biases and tied embeddings
CASES = {
    "dgq": ("llama", DGQConfig(method="dgq", group_size=32, grid1=4, grid2=4, refine=1, search_tokens=64)),
    "dgq-static": ("qwen2", DGQConfig(method="rtn", group_size=32, act="static")),
    "w8a8": ("llama", DGQConfig(method="smoothquant")),
    "w8a8-static": ("qwen2", DGQConfig(method="smoothquant", act="static")),
    "w4a16": ("llama", DGQConfig(method="gptq", group_size=32)),
    "dgq-weights-only": ("qwen2", DGQConfig(method="rtn", group_size=32, weights_only=True)),
    "ignore": ("llama", DGQConfig(method="rtn", group_size=32, ignore=("model.layers.1.self_attn.k_proj",))),
    # rotate_residual unties qwen2's embeddings: the export carries the new lm_head
    "rotated": ("qwen2", DGQConfig(method="dgq", group_size=32, grid1=4, grid2=4, refine=1, search_tokens=64,
                                   rotate="on", rotate_residual=True)),
}
W8A8_CASES = ["dgq", "dgq-static", "w8a8", "w8a8-static", "ignore", "rotated"]
W4A16_CASES = ["dgq", "dgq-static", "w4a16", "dgq-weights-only", "ignore", "rotated"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-src")
    out = {}
    for name, (family, cfg) in CASES.items():
        model = make_tiny(family)
        dgq.quantize(model, cfg, calib=CALIB, progress=False)
        # a sharded source: modules may straddle shards
        out[name] = dgq.save(model, root / name, tokenizer=tokenizer(), max_shard_size="30KB")
    return out


def load_ct(path, dequantize: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(
            dequantize=dequantize)).eval()


def float_reference(ckpt, dtype=torch.float32):
    """The dgq checkpoint with every quantized linear replaced by a float linear holding dgq's dequantized weight
    (float activations): what a dequantized export must compute."""
    model = dgq.load(ckpt, fuse=False)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(m.dequantized_weight(dtype))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            set_submodule(model, name, lin)
    return model.to(dtype).eval()


def quantized_modules(ckpt):
    return {n: m for n, m in dgq.load(ckpt, fuse=False).named_modules() if isinstance(m, QuantLinear)}


def weights(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def check_config(out, target):
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    parsed = QuantizationConfig.model_validate(q)  # compressed-tensors' own config model
    dumped = parsed.model_dump()
    for key in ("quant_method", "format", "quantization_status", "ignore"):
        assert dumped[key] == q[key], key
    g = q["config_groups"]["group_0"]
    assert dumped["config_groups"]["group_0"]["weights"] == g["weights"]
    assert dumped["config_groups"]["group_0"]["input_activations"] == g["input_activations"]
    assert "dgq" not in json.dumps(q) and "dgq checkpoint" not in json.dumps(cfg)  # no guard
    assert cfg["dgq_export"]["target"] == target
    return cfg


@pytest.mark.parametrize("case", W8A8_CASES)
def test_ct_w8a8(ckpts, tmp_path, case):
    ck = ckpts[case]
    out = dgq.export(ck, to="ct-w8a8", out=tmp_path / "ct")
    cfg = check_config(out, "ct-w8a8")
    q = cfg["quantization_config"]
    static = CASES[case][1].act == "static"
    assert q["format"] == "int-quantized"
    assert q["config_groups"]["group_0"]["input_activations"]["strategy"] == ("tensor" if static else "token")
    assert q["config_groups"]["group_0"]["input_activations"]["dynamic"] is (not static)
    mods = quantized_modules(ck)
    assert "lm_head" in q["ignore"] and set(q["ignore"]).isdisjoint(mods)
    if case == "ignore":
        assert "model.layers.1.self_attn.k_proj" in q["ignore"]
    # the tensors: exact int8 weights and s_ch
    t = weights(out)
    for name, m in mods.items():
        assert torch.equal(t[f"{name}.weight"], m.int8_weight()) and t[f"{name}.weight"].dtype == torch.int8
        assert t[f"{name}.weight_scale"].shape == (m.out_features, 1)
        assert torch.equal(t[f"{name}.weight_scale"][:, 0], m.channel_scale)
        assert (f"{name}.input_scale" in t) is static
        if static:
            assert t[f"{name}.input_scale"].shape == (1,) and float(t[f"{name}.input_scale"]) == float(m.act_scale)
    assert not any("inv_freq" in n or n.endswith(".act_scale") for n in t)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    # transformers' compressed-tensors loader, dequantizing: dgq's dequantized weights bit for bit (int8 * float32
    # scale in float32 is the same product dgq computes), float tensors as saved, logits bitwise the float reference
    dense = load_ct(out, dequantize=True)
    for name, m in mods.items():
        assert torch.equal(dense.get_submodule(name).weight, m.dequantized_weight()), name
    ref = float_reference(ck)
    sd = dense.state_dict()
    for n, p in ref.state_dict().items():
        if n in sd and "proj" not in n:
            assert torch.equal(sd[n], p), n
    with torch.no_grad():
        assert torch.equal(dense(IDS).logits, ref(IDS).logits)
    # compressed (int8 weights kept, activations fake-quantized by compressed-tensors) vs dgq's int8 execution:
    # close, not equal: compressed-tensors rounds activations with absmax/127.5 to -128..127 (dgq and vLLM's int8
    # kernels: absmax/127 to -127..127), so activations differ by up to one code per element
    comp = load_ct(out, dequantize=False)
    assert comp.get_submodule(next(iter(mods))).weight.dtype == torch.int8
    with torch.no_grad():
        a, b = comp(IDS).logits, dgq.load(ck)(IDS).logits
    assert ((a - b).norm() / b.norm()).item() < 0.02


@pytest.mark.parametrize("case", W4A16_CASES)
def test_ct_w4a16(ckpts, tmp_path, case):
    ck = ckpts[case]
    out = dgq.export(ck, to="ct-w4a16", out=tmp_path / "ct", max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file()  # sharded output
    q = check_config(out, "ct-w4a16")["quantization_config"]
    w = q["config_groups"]["group_0"]["weights"]
    assert (q["format"], w["strategy"], w["group_size"], w["symmetric"]) == ("pack-quantized", "group", 32, False)
    assert q["config_groups"]["group_0"]["input_activations"] is None
    mods = quantized_modules(ck)
    t = weights(out)
    for name, m in mods.items():
        n, k = m.out_features, m.in_features
        assert t[f"{name}.weight_packed"].shape == (n, k // 8) and t[f"{name}.weight_packed"].dtype == torch.int32
        assert t[f"{name}.weight_zero_point"].shape == ((n + 7) // 8, k // 32)
        assert t[f"{name}.weight_scale"].shape == (n, k // 32) and t[f"{name}.weight_scale"].dtype == torch.float32
        assert t[f"{name}.weight_shape"].tolist() == [n, k]
    dense = load_ct(out, dequantize=True)
    for name, m in mods.items():
        got, want = dense.get_submodule(name).weight, m.dequantized_weight()
        if m.format == "w4a16":  # float16 scales held exactly in float32: (q - z) * scale as dgq computes it
            assert torch.equal(got, want), name
        else:  # (q - z) * fl(s_ch * s_int) vs fl(s_ch * (s_int * (q - z))): two float32 roundings at most
            assert ((got - want).abs() <= torch.finfo(torch.float32).eps * want.abs()).all(), name
    ref = float_reference(ck)
    with torch.no_grad():
        a, b = dense(IDS).logits, ref(IDS).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ct_w4a16_half_scales(tmp_path, dtype):
    """In a 16-bit model the folded scale s_ch * s_int is rounded to the model's dtype (the scale dtype
    compressed-tensors and vLLM use): each dequantized weight is within one rounding of the scale plus one of the
    product (compressed-tensors dequantizes in the scale dtype), i.e. |w - w_dgq| <= eps(dtype) * |w_dgq|."""
    model = make_tiny("llama").to(dtype)
    model.model.rotary_emb.float()  # as from_pretrained keeps it
    model.config.dtype = dtype
    dgq.quantize(model, DGQConfig(method="rtn", group_size=32), progress=False)
    ck = dgq.save(model, tmp_path / "ck")
    out = dgq.export(ck, to="ct-w4a16", out=tmp_path / "ct")
    t = weights(out)
    mods = quantized_modules(ck)
    dense = load_ct(out, dequantize=True)
    eps = torch.finfo(dtype).eps
    for name, m in mods.items():
        assert t[f"{name}.weight_scale"].dtype == dtype
        folded = m.channel_scale[:, None] * m.scales.float()
        assert torch.equal(t[f"{name}.weight_scale"], folded.to(dtype))  # round to nearest, once
        got, want = dense.get_submodule(name).weight.float(), m.dequantized_weight()
        assert ((got - want).abs() <= eps * want.abs() * (1 + eps)).all(), name


@pytest.mark.parametrize("shape", [(16, 64), (13, 20), (1, 8), (9, 3)])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_int4_matches_compressed_tensors(shape, dim):
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(sum(shape)))
    ours = pack_int4_codes(codes, dim=dim)
    theirs = pack_to_int32((codes - 8).to(torch.int8), 4, packed_dim=dim)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)


def test_tampered_export_refused_by_target(ckpts, tmp_path):
    out = dgq.export(ckpts["dgq"], to="ct-w8a8", out=tmp_path / "ct", max_shard_size="1GB")
    f = out / "model.safetensors"
    t = load_file(f)
    name = "model.layers.0.mlp.down_proj.weight_scale"
    t[name] = t[name][:, 0].contiguous()  # [N] instead of [N, 1]
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="mismatch"):
        load_ct(out, dequantize=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "per-row"
    with pytest.raises(ValueError):
        QuantizationConfig.model_validate(cfg["quantization_config"])


@pytest.mark.parametrize("case,to,words", [("w4a16", "ct-w8a8", "ct-w4a16"),
                                           ("dgq-weights-only", "ct-w8a8", "ct-w4a16"),
                                           ("w8a8", "ct-w4a16", "ct-w8a8")])
def test_refuses_what_the_target_cannot_hold(ckpts, tmp_path, case, to, words):
    with pytest.raises(DGQError, match=words) as e:
        dgq.export(ckpts[case], to=to, out=tmp_path / "ct")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_refusals(ckpts, tmp_path, capsys):
    hf = tmp_path / "hf"
    make_tiny("llama").save_pretrained(hf)
    with pytest.raises(DGQError, match="not a dgq checkpoint"):
        dgq.export(hf, to="ct-w8a8", out=tmp_path / "a")
    with pytest.raises(DGQError, match="unknown export target"):
        dgq.export(ckpts["dgq"], to="gguf", out=tmp_path / "a")
    with pytest.raises(DGQError, match="being exported"):
        dgq.export(ckpts["dgq"], to="ct-w8a8", out=ckpts["dgq"], force=True)
    with pytest.raises(DGQError, match="--force only replaces"):  # not something dgq wrote
        dgq.export(ckpts["dgq"], to="ct-w8a8", out=hf, force=True)
    assert not (tmp_path / "a").exists()
    out = dgq.export(ckpts["dgq"], to="ct-w8a8", out=tmp_path / "ct")
    before = weights(out)
    with pytest.raises(DGQError, match="already exists"):
        dgq.export(ckpts["w8a8"], to="ct-w8a8", out=out)
    assert all(torch.equal(before[n], t) for n, t in weights(out).items())
    dgq.export(ckpts["w8a8"], to="ct-w8a8", out=out, force=True)  # an earlier export: replaced
    assert weights(out).keys() != before.keys() or any(not torch.equal(before[n], t) for n, t in weights(out).items())
    # the CLI: one line, exit code 2, nothing written
    capsys.readouterr()
    assert main(["export", str(ckpts["w4a16"]), "--to", "ct-w8a8", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgq: error: ") and err.count("\n") == 1 and "ct-w4a16" in err
    assert not (tmp_path / "b").exists()
    assert main(["export", str(ckpts["dgq"]), "--to", "ct-w8a8", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(ckpts["dgq"]), "--to", "ct-w9", "--out", str(tmp_path / "b")]) == 2
    assert main(["export", str(ckpts["dgq"]), "--to", "ct-w8a8", "--out", str(tmp_path / "b")]) == 0
    assert torch.equal(weights(tmp_path / "b")["model.layers.0.mlp.up_proj.weight"],
                       quantized_modules(ckpts["dgq"])["model.layers.0.mlp.up_proj"].int8_weight())


def test_corrupt_source_refused(ckpts, tmp_path):
    """The source is checked as dgq.load checks it (checksums): a flipped byte is refused, nothing written."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ckpts["dgq"], src)
    f = sorted(src.glob("model-*.safetensors"))[-1]
    b = bytearray(f.read_bytes())
    b[-1] ^= 1
    f.write_bytes(bytes(b))
    with pytest.raises(DGQError, match="checksum"):
        dgq.export(src, to="ct-w8a8", out=tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_export_streams_shard_by_shard(ckpts, tmp_path, monkeypatch):
    """The writer holds at most one shard plus one module's tensors; the source is read tensor by tensor."""
    from dgq.checkpoint import CheckpointWriter

    peak, adds = [0], []
    orig = CheckpointWriter.add

    def add(self, tensors):
        adds.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        orig(self, tensors)
        peak[0] = max(peak[0], self.pending_bytes)

    monkeypatch.setattr(CheckpointWriter, "add", add)
    out = dgq.export(ckpts["dgq"], to="ct-w8a8", out=tmp_path / "ct", max_shard_size="40KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    assert peak[0] <= 40_000 + max(adds)
    exp = json.loads((out / "config.json").read_text())["dgq_export"]
    assert exp["source"] == "dgq" and "/" not in json.dumps(exp)


@pytest.mark.parametrize("edit,words", [("drop", "missing"), ("add", "does not have")])
def test_source_tensors_checked(ckpts, tmp_path, edit, words):
    """Without the checksums (verify=False) the source's tensors are still checked by name, as dgq.load does."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ckpts["w8a8"], src)
    (f,) = [f for f in src.glob("model-*.safetensors") if "model.norm.weight" in load_file(f)]
    t = load_file(f)
    if edit == "drop":
        del t["model.norm.weight"]
    else:
        t["model.extra"] = torch.zeros(3)
    save_file(t, f, metadata={"format": "pt"})
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"].pop("model.norm.weight") if edit == "drop" else idx["weight_map"].update({"model.extra": f.name})
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(DGQError, match=words):
        dgq.export(src, to="ct-w8a8", out=tmp_path / "ct", verify=False)
    assert not (tmp_path / "ct").exists()
