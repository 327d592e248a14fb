"""transformers-native loading (dgq.hf) on transformers 4.57, the last 4.x: the installed transformers is 5.x, so
each check runs in a subprocess with transformers 4.57.6 (and the huggingface-hub / tokenizers it needs) installed
with ``pip --target`` into the dgq cache (created on first use, ~15 s; ``make tf457`` does the same) ahead of the
venv on ``PYTHONPATH``, reusing the venv's torch. The child is this file run as a script: it quantizes the tiny
models with 4.57 (a checkpoint holds transformers' rotary tables, which differ between 4.57 and 5.x), saves them and
reports what ``from_pretrained`` does, with and without ``import dgq``."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PINS = ("transformers==4.57.6", "huggingface-hub==0.36.2", "tokenizers==0.22.2")
TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
CASES = ("dgq", "w4a16", "w8a8", "qwen2")
GUARD_ERROR = 'ValueError Specified `attn_implementation="dgq checkpoint: run `import dgq` before from_pretrained'


def target() -> Path:
    return Path(os.environ.get("DGQ_CACHE", "~/.cache/dgq")).expanduser() / "transformers-4.57.6"


def install() -> Path:
    """The --target folder with 4.57's packages (installed into a temporary folder, then renamed: atomic)."""
    out = target()
    if (out / "transformers" / "__init__.py").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp), *PINS],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"pip install {' '.join(PINS)} failed: {(p.stderr or p.stdout).strip()[-600:]}")
    try:
        tmp.rename(out)
    except OSError:  # another process installed it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_child(mode: str, folder: Path, tf457: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (tf457, SRC, TESTS))), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, __file__, mode, str(folder)], capture_output=True, text=True,
                          timeout=600, env=env)


def results(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tf457():
    try:
        return install()
    except RuntimeError as e:
        if any(s in str(e) for s in ("No matching distribution", "Could not find a version", "Failed to establish",
                                     "Network is unreachable", "Max retries exceeded")):
            pytest.skip(f"the package registry has no transformers 4.57 here: {str(e)[-300:]}")
        raise


@pytest.fixture(scope="module")
def dgq_run(tf457, tmp_path_factory):
    """The child with ``import dgq``: the checkpoints it wrote and what it measured."""
    folder = tmp_path_factory.mktemp("tf457")
    return folder, results(run_child("dgq", folder, tf457))


def test_child_runs_transformers_457(dgq_run):
    r = dgq_run[1]
    assert r["transformers"] == "4.57.6" and r["huggingface_hub"].startswith("0.")
    assert Path(r["dgq"]).is_relative_to(SRC)


@pytest.mark.parametrize("case", CASES)
def test_from_pretrained_equals_dgq_load(dgq_run, case):
    r = dgq_run[1]["cases"][case]
    # default dtype, device_map="cpu" with dtype=float32, and the deprecated torch_dtype: bitwise dgq.load's logits
    assert r["equal"] == {"default": True, "cpu_f32": True, "torch_dtype": True}, r
    assert r["quantized"] == 14 and r["fused"] and r["is_quantized"]
    if case == "qwen2":
        assert r["tied"]


def test_requested_attention(dgq_run):
    """4.57 reads config.json's guard over an ``attn_implementation`` given to AutoModelForCausalLM (it is consumed
    with the config): the model gets the default (sdpa); a model class's from_pretrained and set_attn_implementation
    honour it."""
    assert dgq_run[1]["cases"]["dgq"]["attn"] == {"requested": "sdpa", "class": "eager", "set": "eager"}


@pytest.mark.parametrize("case", ["dgq", "w4a16", "w8a8"])
def test_bf16_keeps_quantized_tensors(dgq_run, case):
    """4.57 casts every float tensor it loads to the model dtype; the quantized modules' own come back as saved."""
    r = dgq_run[1]["cases"][case]["bf16"]
    expected = {"dgq": {"qweight": "uint8", "zeros": "int8", "scales": "int8", "channel_scale": "float32",
                        "act_scale": "float32"},
                "w4a16": {"qweight": "uint8", "zeros": "uint8", "scales": "float16"},
                "w8a8": {"weight": "int8", "channel_scale": "float32", "act_scale": "float32"}}[case]
    assert r["dtypes"] == {k: f"torch.{v}" for k, v in expected.items()}
    assert r["equal_to_dgq_load"] and r["embed"] == "torch.bfloat16" and r["finite"]


def test_save_pretrained_round_trip(dgq_run):
    r = dgq_run[1]["resave"]
    assert r["shards"] > 2 and r["guard"] and r["checksums"]
    assert r["dgq_load"] and r["from_pretrained"] and r["dgq_save_then_from_pretrained"]


def test_pipeline_generates_like_dgq_load(dgq_run):
    r = dgq_run[1]["pipeline"]
    assert r["pipeline"].split() == r["dgq_load"].split() and len(r["dgq_load"].split()) > 0
    assert r["by_name"] == r["pipeline"]


def test_int8_kv_cache_checkpoint(dgq_run):
    assert dgq_run[1]["kv"] == {"mode": "int8-static", "equal": True}


def test_legacy_guard(dgq_run):
    """A checkpoint with the first guard (``transformers_weights``): dgq.load reads it; 4.57's from_pretrained refuses
    it even after ``import dgq`` (it reads the name before any quantizer hook) with the guard's message."""
    r = dgq_run[1]["legacy"]
    assert r["dgq_load"]
    assert r["from_pretrained"].startswith("ValueError The transformers file in the config seems to be incorrect")
    assert "dgq checkpoint: run `import dgq`" in r["from_pretrained"]


def test_checkpoints_move_between_versions(dgq_run, tf457, tmp_path):
    """A checkpoint written under 4.57 loads under 5.x and one written under 5.x loads under 4.57 (5.x keeps an
    extra rotary table, ``original_inv_freq``: filled from ``inv_freq`` / not read), with the same logits."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import dgq
    from dgq import DGQConfig
    from tiny import make_tiny, tokenizer

    folder, _ = dgq_run
    ids = torch.randint(1, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    old = load_file(folder / "logits-4.57.safetensors")
    with torch.no_grad():
        for case in ("dgq", "qwen2"):
            torch.testing.assert_close(dgq.load(folder / case)(ids).logits, old[case], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(folder / case)(ids).logits, old[case],
                                       rtol=1e-5, atol=1e-5)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    new, want = tmp_path / "new", {}
    for case, family in (("llama", "llama"), ("qwen2", "qwen2")):
        m = make_tiny(family)
        dgq.quantize(m, DGQConfig(method="rtn", group_size=32), calib=calib, progress=False)
        path = dgq.save(m, new / case, tokenizer=tokenizer())
        assert any(n.endswith("original_inv_freq") for n in load_file(path / "model.safetensors"))  # 5.x's table
        with torch.no_grad():
            want[case] = dgq.load(path)(ids).logits
    r = results(run_child("cross", new, tf457))
    assert r["transformers"] == "4.57.6" and len(r["loaded"]) == 4
    got = load_file(new / "logits-cross.safetensors")
    for case, ref in want.items():
        for how in ("dgq_load", "from_pretrained"):
            torch.testing.assert_close(got[f"{case}/{how}"], ref, rtol=1e-5, atol=1e-5)


def test_plain_transformers_refuses(dgq_run, tf457):
    """Without ``import dgq``, 4.57's from_pretrained raises instead of random-initialising the quantized layers:
    every format, and a folder re-saved with save_pretrained."""
    folder, _ = dgq_run
    r = results(run_child("plain", folder, tf457))
    assert r["transformers"] == "4.57.6" and not r["dgq_imported"]
    assert set(r["errors"]) == {*CASES, "resaved"}
    for name, msg in r["errors"].items():
        assert msg.startswith(GUARD_ERROR), (name, msg)


# -- the child: runs with transformers 4.57 first on sys.path -------------------------------------------------------
def child_dgq(folder: Path) -> dict:
    import huggingface_hub
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, pipeline

    import dgq
    from dgq import DGQConfig
    from dgq.checkpoint import HF_GUARD, HF_GUARD_KEYS, HF_LEGACY_GUARD_KEY
    from dgq.formats import QuantLinear
    from test_hf import reseal
    from tiny import make_tiny, tokenizer

    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    ids = torch.randint(1, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    configs = {"dgq": ("llama", DGQConfig(method="dgq", group_size=32, grid1=4, grid2=4, refine=1, search_tokens=64)),
               "w4a16": ("llama", DGQConfig(method="gptq", group_size=32)),
               "w8a8": ("llama", DGQConfig(method="smoothquant", act="static")),
               "qwen2": ("qwen2", DGQConfig(method="rtn", group_size=32))}

    def logits(model):
        with torch.no_grad():
            return model(ids).logits

    out = {"transformers": transformers.__version__, "huggingface_hub": huggingface_hub.__version__,
           "dgq": dgq.__file__, "cases": {}}
    paths = {}
    written = {}
    for case, (family, config) in configs.items():
        m = make_tiny(family)
        dgq.quantize(m, config, calib=calib, progress=False)
        path = paths[case] = dgq.save(m, folder / case, tokenizer=tokenizer())
        ref = dgq.load(path)
        want = written[case] = logits(ref)
        model = AutoModelForCausalLM.from_pretrained(path)
        quant = {n: q for n, q in model.named_modules() if isinstance(q, QuantLinear)}
        r = out["cases"][case] = {
            "equal": {"default": torch.equal(logits(model), want),
                      "cpu_f32": torch.equal(logits(AutoModelForCausalLM.from_pretrained(
                          path, device_map="cpu", dtype=torch.float32)), want),
                      "torch_dtype": torch.equal(logits(AutoModelForCausalLM.from_pretrained(
                          path, torch_dtype=torch.float32)), want)},
            "quantized": len(quant), "is_quantized": bool(model.is_quantized),
            "fused": all(q.siblings is not None for n, q in quant.items() if n.endswith(("q_proj", "gate_proj"))),
            "tied": model.lm_head.weight is model.model.embed_tokens.weight}
        if case == "dgq":  # 4.57 sets the guard over a requested attention; set_attn_implementation changes it
            auto = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
            direct = type(model).from_pretrained(path, attn_implementation="eager")  # LlamaForCausalLM
            r["attn"] = {"requested": auto.config._attn_implementation, "class": direct.config._attn_implementation}
            auto.set_attn_implementation("eager")
            r["attn"]["set"] = auto.config._attn_implementation
        bf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        lin, lin_ref = (x.get_submodule("model.layers.0.self_attn.q_proj") for x in (bf, ref))
        r["bf16"] = {"dtypes": {n: str(t.dtype) for n, t in lin.named_buffers() if n != "bias"},
                     "equal_to_dgq_load": all(torch.equal(t, lin_ref.get_buffer(n)) for n, t in lin.named_buffers()
                                              if n != "bias"),
                     "embed": str(bf.model.embed_tokens.weight.dtype), "finite": bool(torch.isfinite(logits(bf)).all())}

    # save_pretrained (sharded) round trip, then dgq.save of a from_pretrained model
    want = logits(dgq.load(paths["dgq"]))
    resaved = folder / "resaved"
    AutoModelForCausalLM.from_pretrained(paths["dgq"]).save_pretrained(resaved, max_shard_size="40KB")
    cfg = json.loads((resaved / "config.json").read_text())
    files = sorted(p.name for p in resaved.glob("*.safetensors"))
    again = AutoModelForCausalLM.from_pretrained(resaved)
    out["resave"] = {"shards": len(files), "guard": all(cfg.get(k) == HF_GUARD for k in HF_GUARD_KEYS),
                     "checksums": set(cfg["quantization_config"]["checksums"]) == {"config.json", *files},
                     "dgq_load": torch.equal(logits(dgq.load(resaved)), want),
                     "from_pretrained": torch.equal(logits(again), want),
                     "dgq_save_then_from_pretrained": torch.equal(logits(AutoModelForCausalLM.from_pretrained(
                         dgq.save(again, folder / "dgq-saved"))), want)}

    tok = tokenizer()
    prompt = "w5 w17 w99 w200"
    pipe = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(paths["dgq"]), tokenizer=tok)
    kw = {"max_new_tokens": 6, "do_sample": False, "return_full_text": False}
    prompt_ids = tok(prompt, return_tensors="pt").input_ids
    ref = dgq.load(paths["dgq"]).generate(prompt_ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    by_name = pipeline("text-generation", model=str(paths["dgq"]))  # the tokenizer saved in the folder
    out["pipeline"] = {"pipeline": pipe(prompt, **kw)[0]["generated_text"],
                       "dgq_load": tok.decode(ref[0, prompt_ids.shape[1]:]),
                       "by_name": by_name(prompt, **kw)[0]["generated_text"]}

    m = make_tiny("llama")  # an int8 KV cache (static scales) is enabled on load too
    dgq.quantize(m, DGQConfig(method="rtn", group_size=32, kv="int8-static"), calib=calib, progress=False)
    kv = dgq.save(m, folder / "kv")
    hf = AutoModelForCausalLM.from_pretrained(kv)
    out["kv"] = {"mode": hf.dgq_kv["mode"], "equal": torch.equal(logits(hf), logits(dgq.load(kv)))}

    legacy = folder / "legacy"
    shutil.copytree(paths["dgq"], legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    for k in HF_GUARD_KEYS:
        del cfg[k]
    cfg[HF_LEGACY_GUARD_KEY] = HF_GUARD
    (legacy / "config.json").write_text(json.dumps(cfg))
    reseal(legacy)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in written.items()}, folder / "logits-4.57.safetensors")
    out["legacy"] = {"dgq_load": torch.equal(logits(dgq.load(legacy)), want)}
    try:
        AutoModelForCausalLM.from_pretrained(legacy)
        out["legacy"]["from_pretrained"] = "LOADED"
    except Exception as e:  # noqa: BLE001 - the message is what the test pins
        out["legacy"]["from_pretrained"] = f"{type(e).__name__} {e}"
    return out


def child_cross(folder: Path) -> dict:
    """Checkpoints written under 5.x (the parent) loaded here under 4.57: their logits, by dgq.load and by
    from_pretrained, into ``folder/logits-cross.safetensors``."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import dgq

    ids = torch.randint(1, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    got = {}
    with torch.no_grad():
        for case in sorted(p.name for p in folder.iterdir() if p.is_dir()):
            got[f"{case}/dgq_load"] = dgq.load(folder / case)(ids).logits
            got[f"{case}/from_pretrained"] = AutoModelForCausalLM.from_pretrained(folder / case)(ids).logits
    save_file(got, folder / "logits-cross.safetensors")
    return {"transformers": transformers.__version__, "loaded": sorted(got)}


def child_plain(folder: Path) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM

    errors = {}
    for name in (*CASES, "resaved"):
        try:
            AutoModelForCausalLM.from_pretrained(folder / name)
            errors[name] = "LOADED"
        except Exception as e:  # noqa: BLE001 - the message is what the test pins
            errors[name] = f"{type(e).__name__} {str(e).splitlines()[0]}"
    return {"transformers": transformers.__version__, "dgq_imported": "dgq" in sys.modules, "errors": errors}


if __name__ == "__main__":
    if sys.argv[1] == "install":  # make tf457
        print(install())
    else:
        child = {"dgq": child_dgq, "plain": child_plain, "cross": child_cross}[sys.argv[1]]
        print(json.dumps(child(Path(sys.argv[2]))))
