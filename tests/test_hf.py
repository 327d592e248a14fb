"""transformers-native loading (dgq.hf): AutoModelForCausalLM.from_pretrained of dgq checkpoints after import dgq,
bitwise equal to dgq.load; save_pretrained round trips; pipelines; plain transformers refuses the checkpoints."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import dgq
from dgq import DGQConfig, DGQError
from dgq.checkpoint import HF_GUARD, HF_GUARD_KEYS, HF_LEGACY_GUARD_KEY, WEIGHTS, config_sha256, file_sha256
from dgq.formats import QuantLinear
from tiny import make_tiny, tokenizer

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
IDS = torch.randint(1, 256, (2, 11), generator=torch.Generator().manual_seed(1))
# one checkpoint per storage format (and a Qwen2-like model: q/k/v biases, tied embeddings)
CASES = {
    "dgq": ("llama", DGQConfig(method="dgq", group_size=32, grid1=4, grid2=4, refine=1, search_tokens=64)),
    "w4a16": ("llama", DGQConfig(method="gptq", group_size=32)),
    "w8a8": ("llama", DGQConfig(method="smoothquant", act="static")),
    "qwen2": ("qwen2", DGQConfig(method="rtn", group_size=32)),
    "ignore": ("llama", DGQConfig(method="rtn", group_size=32, ignore=("model.layers.1.self_attn.k_proj",))),
}
FORMAT = {"dgq": "dgq", "w4a16": "w4a16", "w8a8": "w8a8", "qwen2": "dgq", "ignore": "dgq"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for case, (family, config) in CASES.items():
        m = make_tiny(family)
        dgq.quantize(m, config, calib=CALIB, progress=False)
        out[case] = dgq.save(m, tmp_path_factory.mktemp(case) / "ck", tokenizer=tokenizer())
    return out


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def hf_load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, **kw)


def copy_of(path, tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(path, dst)
    return dst


def reseal(path):
    """Recompute the checksums after an edit, as a writer would: only dgq's own checks can then catch it."""
    cfg = json.loads((path / "config.json").read_text())
    q = cfg["quantization_config"]
    q.pop("checksums", None)
    sums = {"config.json": f"sha256:{config_sha256(cfg)}", WEIGHTS: f"sha256:{file_sha256(path / WEIGHTS)}"}
    q["checksums"] = sums
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", list(CASES))
def test_from_pretrained_equals_dgq_load(ckpts, case):
    path = ckpts[case]
    ref = dgq.load(path)
    model = hf_load(path)
    assert torch.equal(logits(model), logits(ref))
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == (13 if case == "ignore" else 14) and {m.format for m in quant.values()} == {FORMAT[case]}
    if case == "ignore":  # left in floating point, read from the checkpoint as it is
        k, k_ref = (m.get_submodule("model.layers.1.self_attn.k_proj") for m in (model, ref))
        assert type(k) is torch.nn.Linear and torch.equal(k.weight, k_ref.weight)
    assert all(m.siblings is not None for n, m in quant.items() if n.endswith(("q_proj", "gate_proj")))  # fused
    assert model.dgq_config["modules"] == ref.dgq_config["modules"] and model.is_quantized
    if case == "qwen2":
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    # device_map and an explicit dtype (the checkpoint's) load the same model
    assert torch.equal(logits(hf_load(path, device_map="cpu", dtype=torch.float32)), logits(ref))


def test_requested_attention(ckpts):
    """The guard in config.json's attn_implementation gives way to transformers' default, or to the one asked for."""
    path = ckpts["dgq"]
    ref = logits(dgq.load(path))
    assert hf_load(path).config._attn_implementation == "sdpa"
    model = hf_load(path, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert torch.allclose(logits(model), ref, atol=1e-4, rtol=1e-4)


def test_other_dtype_keeps_quantized_tensors(ckpts):
    """dtype=bfloat16 casts the float weights (embeddings, norms, biases) but never the quantized tensors."""
    for case in ("dgq", "w4a16", "w8a8"):
        model = hf_load(ckpts[case], dtype=torch.bfloat16)
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        lin = model.model.layers[0].self_attn.q_proj
        expected = {"dgq": {"qweight": torch.uint8, "zeros": torch.int8, "scales": torch.int8,
                            "channel_scale": torch.float32, "act_scale": torch.float32},
                    "w4a16": {"qweight": torch.uint8, "zeros": torch.uint8, "scales": torch.float16},
                    "w8a8": {"weight": torch.int8, "channel_scale": torch.float32, "act_scale": torch.float32}}[case]
        assert {n: t.dtype for n, t in lin.named_buffers() if n != "bias"} == expected
        ref = dgq.load(ckpts[case])
        for n, t in lin.named_buffers():
            assert torch.equal(t, ref.get_submodule("model.layers.0.self_attn.q_proj").get_buffer(n))
        out = logits(model)
        assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("case", ["dgq", "qwen2"])
def test_save_pretrained_round_trip(ckpts, case, tmp_path):
    path = ckpts[case]
    ref = logits(dgq.load(path))
    model = hf_load(path)
    out = tmp_path / "resaved"
    model.save_pretrained(out, max_shard_size="40KB")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and (out / "model.safetensors.index.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert all(cfg[k] == HF_GUARD for k in HF_GUARD_KEYS)
    assert set(cfg["quantization_config"]["checksums"]) == {"config.json", *files}
    # both loaders, checksums verified
    assert torch.equal(logits(dgq.load(out)), ref)
    again = hf_load(out)
    assert torch.equal(logits(again), ref)
    # and once more, unsharded, from the re-loaded model; dgq.save of a from_pretrained model works too
    again.save_pretrained(tmp_path / "twice")
    assert torch.equal(logits(dgq.load(tmp_path / "twice")), ref)
    dgq.save(again, tmp_path / "dgq-saved")
    assert torch.equal(logits(hf_load(tmp_path / "dgq-saved")), ref)


def test_pipeline_generates_like_dgq_load(ckpts):
    from transformers import pipeline

    path = ckpts["dgq"]
    tok = tokenizer()
    prompt = "w5 w17 w99 w200"
    pipe = pipeline("text-generation", model=hf_load(path), tokenizer=tok)
    text = pipe(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = dgq.load(path).generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert text.split() == tok.decode(ref[0, ids.shape[1]:]).split() and len(text.split()) > 0
    # the pipeline loads the folder by name too (its tokenizer is saved there)
    assert pipeline("text-generation", model=str(path))(prompt, max_new_tokens=6, do_sample=False,
                                                        return_full_text=False)[0]["generated_text"] == text


PLAIN = """
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as e:
    assert "dgq" not in sys.modules
    print(type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    sys.exit(3)
print("LOADED")
"""


def run_plain(path):
    p = subprocess.run([sys.executable, "-c", PLAIN, str(path)], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout.strip()


def test_plain_transformers_refuses(ckpts, tmp_path):
    """Without import dgq, from_pretrained raises (naming the fix) instead of random-initialising the quantized
    layers; also for a folder re-saved with save_pretrained, and for one with the legacy guard. (4.57: see
    test_hf_tf457.py.)"""
    guard = f'ValueError Specified `attn_implementation="{HF_GUARD}"` is not supported'
    for case in ("dgq", "w8a8"):
        code, out = run_plain(ckpts[case])
        assert code == 3 and out.startswith(guard), out
    hf_load(ckpts["dgq"]).save_pretrained(tmp_path / "resaved")
    code, out = run_plain(tmp_path / "resaved")
    assert code == 3 and out.startswith(guard), out
    code, out = run_plain(legacy_copy(ckpts["dgq"], tmp_path))
    assert code == 3 and out.startswith("ValueError") and "`import dgq`" in out, out


def legacy_copy(path, tmp_path):
    """A checkpoint with the first guard (a weights file name in ``transformers_weights``), as dgq wrote before."""
    legacy = copy_of(path, tmp_path, "legacy")
    cfg = json.loads((legacy / "config.json").read_text())
    for k in HF_GUARD_KEYS:
        del cfg[k]
    cfg[HF_LEGACY_GUARD_KEY] = HF_GUARD
    (legacy / "config.json").write_text(json.dumps(cfg))
    reseal(legacy)
    return legacy


def test_checkpoints_without_guard_still_load(ckpts, tmp_path):
    """Checkpoints written before the guard (format 2), with the legacy guard, and format 1 (no checksums) load
    with both loaders."""
    ref = logits(dgq.load(ckpts["dgq"]))
    v2 = copy_of(ckpts["dgq"], tmp_path, "v2")
    cfg = json.loads((v2 / "config.json").read_text())
    for k in HF_GUARD_KEYS:
        del cfg[k]
    (v2 / "config.json").write_text(json.dumps(cfg))
    reseal(v2)
    v1 = copy_of(v2, tmp_path, "v1")
    cfg = json.loads((v1 / "config.json").read_text())
    del cfg["quantization_config"]["checksums"]
    cfg["quantization_config"]["format_version"] = 1
    (v1 / "config.json").write_text(json.dumps(cfg))
    for path in (v2, v1, legacy_copy(ckpts["dgq"], tmp_path)):
        assert torch.equal(logits(dgq.load(path)), ref)
        assert torch.equal(logits(hf_load(path)), ref)


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_bad_checkpoints_raise_dgq_errors(ckpts, tmp_path):
    src = ckpts["dgq"]
    # a flipped byte in the weights: the checksum
    path = copy_of(src, tmp_path, "flip")
    raw = bytearray((path / WEIGHTS).read_bytes())
    raw[-5] ^= 0xFF
    (path / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(DGQError, match="does not match the checksum") as e:
        hf_load(path)
    one_line(e)

    def edit_tensors(name, fn):
        p = copy_of(src, tmp_path, name)
        t = load_file(p / WEIGHTS)
        fn(t)
        save_file(t, p / WEIGHTS, metadata={"format": "pt"})
        reseal(p)
        return p

    def corrupt_codes(t):
        t["model.layers.0.mlp.up_proj.scales"][0, 0] = 100
        t["model.layers.0.mlp.up_proj.qweight"][0, 0] = 0xFF
        t["model.layers.0.mlp.up_proj.zeros"][0, 0] = 0

    # corrupt tensors with valid checksums: the format's own checks
    with pytest.raises(DGQError, match="up_proj: codes outside the int8-safe range") as e:
        hf_load(edit_tensors("codes", corrupt_codes))
    one_line(e)
    with pytest.raises(DGQError, match="channel_scale holds NaN/Inf") as e:
        hf_load(edit_tensors("nan", lambda t: t["model.layers.1.mlp.down_proj.channel_scale"].fill_(torch.nan)))
    one_line(e)
    with pytest.raises(DGQError, match=r"tensor model.layers.1.mlp.down_proj.scales is missing") as e:
        hf_load(edit_tensors("missing", lambda t: t.pop("model.layers.1.mlp.down_proj.scales")))
    one_line(e)
    with pytest.raises(DGQError, match=r"q_proj.zeros has shape \(3, 3\)") as e:
        hf_load(edit_tensors("shape", lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.zeros",
                                                              torch.zeros(3, 3, dtype=torch.int8))))
    one_line(e)
    with pytest.raises(DGQError, match=r"q_proj.scales is I32, expected torch.int8") as e:
        hf_load(edit_tensors("dtype", lambda t: t.__setitem__(
            "model.layers.0.self_attn.q_proj.scales", t["model.layers.0.self_attn.q_proj.scales"].int())))
    one_line(e)
    with pytest.raises(DGQError, match=r"embed_tokens.weight is I8, expected a float tensor") as e:
        hf_load(edit_tensors("intemb", lambda t: t.__setitem__(
            "model.embed_tokens.weight", t["model.embed_tokens.weight"].to(torch.int8))))
    one_line(e)

    def edit_config(name, fn):
        p = copy_of(src, tmp_path, name)
        cfg = json.loads((p / "config.json").read_text())
        fn(cfg["quantization_config"])
        (p / "config.json").write_text(json.dumps(cfg))
        reseal(p)
        return p

    with pytest.raises(DGQError, match="has format 'nope', which this dgq does not know") as e:
        hf_load(edit_config("format", lambda q: q["modules"]["model.layers.0.mlp.up_proj"].__setitem__("format",
                                                                                                       "nope")))
    one_line(e)
    with pytest.raises(DGQError, match="format version 99, newer than this dgq reads") as e:
        hf_load(edit_config("version", lambda q: q.__setitem__("format_version", 99)))
    one_line(e)
    # an edited config.json without resealing: the config checksum
    path = copy_of(src, tmp_path, "edited")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.5
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DGQError, match="config.json was modified") as e:
        hf_load(path)
    one_line(e)


def test_registration_is_idempotent():
    from transformers.quantizers import auto

    from dgq import hf

    before = (auto.AUTO_QUANTIZATION_CONFIG_MAPPING["dgq"], auto.AUTO_QUANTIZER_MAPPING["dgq"])
    assert hf.register() and hf.register()
    assert before == (hf.DGQQuantizationConfig, hf.DGQHfQuantizer)
    assert (auto.AUTO_QUANTIZATION_CONFIG_MAPPING["dgq"], auto.AUTO_QUANTIZER_MAPPING["dgq"]) == before


def test_bf16_checkpoint(tmp_path):
    """A checkpoint of a bfloat16 model: dtype="auto" (or bfloat16) loads it as dgq.load does, bitwise."""
    make_tiny("llama").save_pretrained(tmp_path / "fp")
    m = hf_load(tmp_path / "fp", dtype=torch.bfloat16)
    dgq.quantize(m, DGQConfig(method="rtn", group_size=32), progress=False)
    path = dgq.save(m, tmp_path / "bf16")
    ref = logits(dgq.load(path))
    assert ref.dtype == torch.bfloat16
    for dtype in ("auto", torch.bfloat16):
        model = hf_load(path, dtype=dtype)
        assert model.model.layers[0].self_attn.q_proj.channel_scale.dtype == torch.float32
        assert torch.equal(logits(model), ref)


@pytest.mark.parametrize("case", ["dgq", "w8a8"])
def test_flipped_bits_same_verdict_as_dgq_load(ckpts, case, tmp_path):
    """Random bit flips in the tensors (checksums recomputed, so only the structural checks can object): from_pretrained
    and dgq.load both refuse with a DGQError, or both load with bitwise equal logits."""
    src = ckpts[case]
    gen = torch.Generator().manual_seed(11)
    tensors = load_file(src / WEIGHTS)
    names = sorted(n for n in tensors if "rotary_emb" not in n)  # rotary tables: transformers recomputes them
    verdicts = set()
    for i in range(13):
        t = dict(tensors)
        name = names[int(torch.randint(len(names), (1,), generator=gen))]
        raw = t[name].clone().reshape(-1).view(torch.uint8)
        at = int(torch.randint(raw.numel(), (1,), generator=gen))
        bit = int(torch.randint(8, (1,), generator=gen))
        if i == 12:  # and one flip that must be refused: the sign of a channel scale
            name, at, bit = "model.layers.1.mlp.up_proj.channel_scale", 3, 7
            raw = t[name].clone().reshape(-1).view(torch.uint8)
        raw[at] ^= 1 << bit
        t[name] = raw.view(t[name].dtype).reshape(t[name].shape)
        path = tmp_path / f"m{i}"
        path.mkdir()
        shutil.copy(src / "config.json", path / "config.json")
        save_file(t, path / WEIGHTS, metadata={"format": "pt"})
        reseal(path)
        results = []
        for load in (dgq.load, hf_load):
            try:
                results.append(logits(load(path)))
            except DGQError as e:
                one_line(pytest.ExceptionInfo.from_exc_info((DGQError, e, e.__traceback__)))
                results.append(None)
        assert (results[0] is None) == (results[1] is None), f"{name}: one loader refused, the other did not"
        if results[0] is not None:
            assert torch.equal(results[0], results[1]) or bool(torch.isnan(results[0]).any()), name
        verdicts.add(results[0] is None)
    assert verdicts == {True, False}  # the flips hit both kinds of bits
