"""dgq export to GGUF (gguf-q4_1, gguf-q8_0), checked with the target's own libraries: gguf's reader sees the
expected tensor types and the source's metadata, gguf's own dequantization of every exported block equals dgq's
dequantized weight within the float16 rounding of the block scales, transformers' GGUF loader reads the file (its
weights are those, its logits close to the dgq weight-only model's), and what the target cannot hold is refused
before anything is written.

The sources are tiny random GGUFs written here with gguf's writer (F32 tensors, llama.cpp's q/k permutation for
llama, a byte-level BPE vocabulary): a Llama (untied output) and a Qwen2 (q/k/v biases, tied embeddings), loaded and
quantized as dgq does any GGUF. llama.cpp itself running the export is the engine test tests/test_llamacpp.py
(``make test-engines``: llama-cpp-python needs a long source build)."""

import json

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import dgq
from dgq import DGQConfig, DGQError
from dgq.arch import set_submodule
from dgq.cli import main
from dgq.export.gguf import permute_rows, unpermute_rows
from dgq.formats import QuantLinear
from dgq.formats.packing import unpack_uint4
from tiny import make_tiny, write_tiny_gguf

VOCAB = 258
CALIB = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(5))
IDS = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
# family, recipe: every dgq storage format; smoothquant folds its scales into the norms (written from the checkpoint)
CASES = {
    "dgq": ("llama", DGQConfig(method="rtn", group_size=32)),
    "dgq-qwen2": ("qwen2", DGQConfig(method="rtn", group_size=32, act="static")),
    "dgq-g64": ("llama", DGQConfig(method="rtn", group_size=64, weights_only=True)),
    "dgq-g16": ("qwen2", DGQConfig(method="rtn", group_size=16)),
    "w4a16": ("llama", DGQConfig(method="gptq", group_size=32)),
    "w8a8": ("llama", DGQConfig(method="smoothquant")),
    "ignore": ("llama", DGQConfig(method="rtn", group_size=32, ignore=("model.layers.1.self_attn.k_proj",))),
    # rotate_residual: embeddings and lm_head rotated; qwen2's tied embeddings untied (a new output.weight)
    "rotated": ("llama", DGQConfig(method="dgq", group_size=32, grid2=4, rotate="on", rotate_residual=True)),
    "rotated-qwen2": ("qwen2", DGQConfig(method="dgq", group_size=32, grid2=4, rotate_residual=True)),
}
Q4_1_CASES = ["dgq", "dgq-qwen2", "dgq-g64", "w4a16", "ignore", "rotated-qwen2"]
Q8_0_CASES = ["dgq", "dgq-qwen2", "dgq-g16", "w4a16", "w8a8", "ignore", "rotated", "rotated-qwen2"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-src")
    out = {}
    for fam in ("llama", "qwen2"):
        (root / fam).mkdir()
        out[fam] = write_tiny_gguf(make_tiny(fam, vocab_size=VOCAB), root / fam / "src.gguf", fam)
    (root / "other").mkdir()  # the same sizes, other weights: not the model a llama checkpoint came from
    out["other"] = write_tiny_gguf(make_tiny("llama", seed=1, vocab_size=VOCAB), root / "other" / "src.gguf", "llama")
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, sources):
    root = tmp_path_factory.mktemp("gguf-ck")
    out = {}
    for name, (fam, cfg) in CASES.items():
        model, tok = dgq.load_model(str(sources[fam]))  # as dgq loads any GGUF: transformers undoes the permutation
        dgq.quantize(model, cfg, calib=CALIB, progress=False)
        out[name] = dgq.save(model, root / name, tokenizer=tok)
    return out


def quantized_modules(ckpt):
    return {n: m for n, m in dgq.load(ckpt, fuse=False).named_modules() if isinstance(m, QuantLinear)}


def float_reference(ckpt):
    """The dgq checkpoint with every quantized linear a float linear of dgq's dequantized weight (float
    activations): the dgq weight-only model, what a GGUF runtime computes up to the block-scale rounding."""
    model = dgq.load(ckpt, fuse=False)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantized_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            set_submodule(model, name, lin)
    return model.float().eval()


def hf_to_gguf_names(model_type, n_layers, names):
    tmap = gguf.TensorNameMap(ARCH[model_type], n_layers)
    return {n: tmap.get_name(n, try_suffixes=(".weight", ".bias")) for n in names}


def bound(m, to):
    """Per weight: the largest |w_gguf - w_dgq| the float16 block scales allow (see dgq.export.gguf):
    q4_1: 2^-11·d·(|q-z| + z) (d, then m = -d·z, each rounded once; 2^-25 absolute below float16's normals);
    q8_0: 2^-11·|w| (d = s_ch rounded once); plus float32 rounding of the products."""
    n, k, g = m.out_features, m.in_features, m.group_size
    w = m.dequantized_weight()
    f32 = 2.0**-22 * w.abs()
    if to == "gguf-q8_0":
        w8 = m.int8_weight().float() if m.format != "w4a16" else \
            unpack_uint4(m.qweight).float() - m.zeros.float().repeat_interleave(g, 1)
        return 2.0**-11 * w.abs() * (1 + 2.0**-10) + 2.0**-25 * w8.abs() + f32
    d = m.channel_scale[:, None] * m.scales.float() if m.format == "dgq" else m.scales.float()
    d, z = d.repeat_interleave(g, 1), m.zeros.float().repeat_interleave(g, 1)
    qz = (unpack_uint4(m.qweight).float() - z).abs()
    return (2.0**-11 * d * (qz + z) * (1 + 2.0**-10) + 2.0**-25 * (qz + z + 1) + f32).view(n, k)


def check_export(ck, src_path, out, to, report, logits_tol=2e-3):
    """The export at ``out`` read back with gguf and transformers (see the module docstring); ``logits_tol``: the
    relative (L2) logits error allowed against the dgq weight-only model (weights within ~2⁻¹¹ relative; it grows
    with depth: 2 layers here, 30 in SmolLM2)."""
    src_r, out_r = gguf.GGUFReader(src_path), gguf.GGUFReader(out)
    # metadata: every key of the source, as it was (the file type is the target's), and the export's record
    for key, f in src_r.fields.items():
        if key.startswith("GGUF.") or key == "general.file_type":
            continue
        assert out_r.fields[key].contents() == f.contents(), key
    ftype = {"gguf-q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "gguf-q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[to]
    assert out_r.fields["general.file_type"].contents() == ftype
    assert json.loads(out_r.fields["dgq.export"].contents())["target"] == to
    # the tensors: the source's names in its order; quantized linears in the target's type, the rest as the source's
    mods = quantized_modules(ck)
    cfg = json.loads((ck / "config.json").read_text())
    arch = cfg["model_type"]
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]} if arch == "llama" else {}
    names = hf_to_gguf_names(arch, cfg["num_hidden_layers"], [f"{n}.weight" for n in mods])
    src_t, out_t = {t.name: t for t in src_r.tensors}, {t.name: t for t in out_r.tensors}
    added = [n for n in out_t if n not in src_t]  # an lm_head the source ties to its embeddings, untied by dgq
    assert list(out_t) == list(src_t) + added and added == ([] if cfg.get("tie_word_embeddings", True) or
                                                            "output.weight" in src_t else ["output.weight"])
    qtype = {"gguf-q4_1": gguf.GGMLQuantizationType.Q4_1, "gguf-q8_0": gguf.GGMLQuantizationType.Q8_0}[to]
    worst = {"abs": 0.0, "rel": 0.0, "of_bound": 0.0}
    for hf, gname in names.items():
        t = out_t[gname]
        assert t.tensor_type == qtype, gname
        n, k = mods[hf[:-7]].out_features, mods[hf[:-7]].in_features
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(n, k)
        h = heads.get(gname.split(".")[-2])
        if h:
            got = unpermute_rows(got, h)
        m = mods[hf[:-7]]
        want = m.dequantized_weight()
        err, bnd = (got - want).abs(), bound(m, to)
        assert (err <= bnd).all(), gname
        worst["abs"] = max(worst["abs"], err.max().item())
        worst["rel"] = max(worst["rel"], (err.max() / want.abs().max()).item())
        worst["of_bound"] = max(worst["of_bound"], torch.where(bnd > 0, err / bnd, 0).max().item())
        if m.format == "w4a16" and to == "gguf-q8_0":
            assert torch.equal(got, want), gname  # float16 scale, int8 q - z: exact
    copied = [n for n in src_t if n not in names.values()]
    sd = float_reference(ck).state_dict()
    g2hf = {v: k for k, v in hf_to_gguf_names(arch, cfg["num_hidden_layers"], sd).items()}
    for gname in copied + added:  # as the source's (bytes and type), or the checkpoint's values in F32 where changed
        a, b = src_t.get(gname), out_t[gname]
        if a is not None and a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data):
            continue
        assert b.tensor_type == gguf.GGMLQuantizationType.F32, gname
        v = torch.from_numpy(np.array(b.data)).reshape(sd[g2hf[gname]].shape)
        h = heads.get(gname.split(".")[-2])
        assert torch.equal(unpermute_rows(v, h) if h else v, sd[g2hf[gname]]), gname
    # transformers' GGUF loader: the same weights, logits close to the dgq weight-only model's
    model = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    for n, m in mods.items():
        err = (model.get_submodule(n).weight - m.dequantized_weight()).abs()
        assert (err <= bound(m, to)).all(), n
    lsd = model.state_dict()
    for n, p in sd.items():
        if n in lsd and not any(n.startswith(q + ".weight") for q in mods):
            assert torch.equal(lsd[n], p), n
    with torch.no_grad():
        a, b = model(IDS).logits, float_reference(ck)(IDS).logits
    rel = ((a - b).norm() / b.norm()).item()
    worst["logits_rel"] = rel
    report(f"{to} {ck.name}: max |w_gguf - w_dgq| {worst['abs']:.3g}, max relative to the tensor's absmax "
           f"{worst['rel']:.3g}, at most {worst['of_bound']:.3f} of the bound; logits relative error {rel:.3g}")
    assert rel < logits_tol
    return worst


@pytest.mark.parametrize("case", Q4_1_CASES)
def test_gguf_q4_1(ckpts, sources, tmp_path, case, report):
    out = dgq.export(ckpts[case], to="gguf-q4_1", out=tmp_path / "out", source_gguf=sources[CASES[case][0]])
    assert out == tmp_path / "out" / "model.gguf" and [p.name for p in (tmp_path / "out").iterdir()] == ["model.gguf"]
    check_export(ckpts[case], sources[CASES[case][0]], out, "gguf-q4_1", report)


@pytest.mark.parametrize("case", Q8_0_CASES)
def test_gguf_q8_0(ckpts, sources, tmp_path, case, report):
    out = dgq.export(ckpts[case], to="gguf-q8_0", out=tmp_path / "m.gguf", source_gguf=sources[CASES[case][0]])
    assert out == tmp_path / "m.gguf" and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary left
    check_export(ckpts[case], sources[CASES[case][0]], out, "gguf-q8_0", report)


def test_smoothed_norms_written_from_checkpoint(ckpts, sources, tmp_path):
    """SmoothQuant folds its scales into the norms: those come from the checkpoint (F32), the rest from the source."""
    out = dgq.export(ckpts["w8a8"], to="gguf-q8_0", out=tmp_path / "m.gguf", source_gguf=sources["llama"])
    src_t = {t.name: t for t in gguf.GGUFReader(sources["llama"]).tensors}
    changed = [t.name for t in gguf.GGUFReader(out).tensors
               if not np.array_equal(t.data, src_t[t.name].data) and t.tensor_type != gguf.GGMLQuantizationType.Q8_0]
    assert changed and all(n.endswith("_norm.weight") for n in changed)


def test_blocks_match_gguf_layout():
    """Our block writers against gguf's own quantizers on values they represent exactly: the same bytes."""
    from dgq.export.gguf import q4_1_blocks, q8_0_blocks

    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (4, 64), generator=g, dtype=torch.uint8)
    codes[:, 0], codes[:, 1] = 0, 15  # each block spans 0..15: gguf's min/max quantizer finds d = 1/16, m = -z/16
    codes[:, 32], codes[:, 33] = 0, 15
    d = torch.full((4, 2), 1 / 16, dtype=torch.float16)
    m = torch.full((4, 2), 0.0, dtype=torch.float16)
    ours = q4_1_blocks(codes, d, m).numpy()
    theirs = gguf.quants.quantize(codes.float().numpy() / 16, gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(ours, theirs)
    qs = torch.randint(-127, 128, (4, 64), generator=g, dtype=torch.int8)
    qs[:, 0], qs[:, 32] = 127, -127
    d8 = torch.full((4, 2), 0.5, dtype=torch.float16)
    assert np.array_equal(q8_0_blocks(qs, d8).numpy(),
                          gguf.quants.quantize(qs.float().numpy() * 0.5, gguf.GGMLQuantizationType.Q8_0))


def test_permutation_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(48, 8)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 2})
    for name, heads in (("blk.0.attn_q.weight", 6), ("blk.0.attn_k.weight", 2)):
        back = proc.process(permute_rows(w[: 8 * heads], heads).numpy(), name).weights
        assert torch.equal(torch.from_numpy(back), w[: 8 * heads])
        assert torch.equal(unpermute_rows(permute_rows(w, heads), heads), w)


@pytest.mark.parametrize("case,to,words", [("w8a8", "gguf-q4_1", "gguf-q8_0"),
                                           ("dgq-g16", "gguf-q4_1", "group size 16")])
def test_refuses_what_the_target_cannot_hold(ckpts, sources, tmp_path, case, to, words):
    with pytest.raises(DGQError, match=words) as e:
        dgq.export(ckpts[case], to=to, out=tmp_path / "o.gguf", source_gguf=sources[CASES[case][0]])
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_source_gguf_checked(ckpts, sources, tmp_path):
    """No source GGUF for a checkpoint of a Hugging Face model; a source of another model is refused."""
    model = make_tiny("llama", vocab_size=VOCAB)
    dgq.quantize(model, DGQConfig(method="rtn", group_size=32), progress=False)
    hf_ck = dgq.save(model, tmp_path / "hf-ck")
    for ck in (hf_ck, ckpts["dgq"]):  # the tiny GGUF is no alias: nothing to find either
        with pytest.raises(DGQError, match="needs the GGUF the model came from.*--source-gguf") as e:
            dgq.export(ck, to="gguf-q4_1", out=tmp_path / "o.gguf")
        assert "\n" not in str(e.value)
    for ck in ("dgq", "rotated"):  # a rotated checkpoint's embeddings are checked against the source's, rotated
        with pytest.raises(DGQError, match="token embeddings differ"):
            dgq.export(ckpts[ck], to="gguf-q8_0", out=tmp_path / "o.gguf", source_gguf=sources["other"])
    with pytest.raises(DGQError, match="'qwen2' model"):
        dgq.export(ckpts["dgq"], to="gguf-q4_1", out=tmp_path / "o.gguf", source_gguf=sources["qwen2"])
    with pytest.raises(DGQError, match="source GGUF not found"):
        dgq.export(ckpts["dgq"], to="gguf-q4_1", out=tmp_path / "o.gguf", source_gguf=tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(DGQError, match="not a GGUF file"):
        dgq.export(ckpts["dgq"], to="gguf-q4_1", out=tmp_path / "o.gguf", source_gguf=bad)
    with pytest.raises(DGQError, match="GGUF targets"):
        dgq.export(ckpts["dgq"], to="ct-w8a8", out=tmp_path / "ct", source_gguf=sources["llama"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "hf-ck"]


def test_outputs_and_cli(ckpts, sources, tmp_path, capsys):
    ck, src = ckpts["dgq"], str(sources["llama"])
    out = dgq.export(ck, to="gguf-q8_0", out=tmp_path / "m.gguf", source_gguf=src)
    before = out.read_bytes()
    with pytest.raises(DGQError, match="already exists"):
        dgq.export(ck, to="gguf-q4_1", out=out, source_gguf=src)
    assert out.read_bytes() == before
    dgq.export(ck, to="gguf-q4_1", out=out, source_gguf=src, force=True)  # an earlier export: replaced
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    with pytest.raises(DGQError, match="--force only replaces"):  # not something dgq wrote
        dgq.export(ck, to="gguf-q4_1", out=sources["llama"], source_gguf=src, force=True)
    folder = dgq.export(ck, to="gguf-q4_1", out=tmp_path / "dir", source_gguf=src).parent
    dgq.export(ck, to="gguf-q8_0", out=folder, source_gguf=src, force=True)  # a folder dgq export wrote
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(DGQError, match="--force only replaces"):
        dgq.export(ck, to="gguf-q4_1", out=tmp_path / "other", source_gguf=src, force=True)
    # the CLI: one line, exit code 2, nothing written
    capsys.readouterr()
    assert main(["export", str(ckpts["w8a8"]), "--to", "gguf-q4_1", "--out", str(tmp_path / "c.gguf"),
                 "--source-gguf", src]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgq: error: ") and err.count("\n") == 1 and "gguf-q8_0" in err
    assert main(["export", str(ck), "--to", "gguf-q4_1", "--out", str(tmp_path / "c.gguf")]) == 2
    assert "--source-gguf" in capsys.readouterr().err
    assert not (tmp_path / "c.gguf").exists()
    assert main(["export", str(ck), "--to", "gguf-q4_1", "--out", str(tmp_path / "c.gguf"), "--source-gguf",
                 src]) == 0
    assert gguf.GGUFReader(tmp_path / "c.gguf").tensors[1].tensor_type == gguf.GGMLQuantizationType.Q4_1


@pytest.mark.slow
def test_smollm2_alias_found(tmp_path, report):
    """A checkpoint of the alias finds its GGUF by itself; the export loads in transformers and its logits are
    close to the dgq weight-only model's (real SmolLM2-135M: tied embeddings, GQA, Q8_0 embeddings copied)."""
    assert main(["quantize", "smollm2-135m", "--method", "rtn", "--group-size", "64", "--weights-only",
                 "--out", str(tmp_path / "ck")]) == 0
    out = dgq.export(tmp_path / "ck", to="gguf-q4_1", out=tmp_path / "s.gguf")
    from dgq.models import alias_gguf

    check_export(tmp_path / "ck", alias_gguf("smollm2-135m"), out, "gguf-q4_1", report, logits_tol=1e-2)
