"""Block-by-block quantization from disk (dgq.stream): one block in memory, bitwise the in-memory result."""

import json

import pytest
import torch
from safetensors.torch import load_file

import dgq
from dgq import DGQConfig, DGQError
from dgq.stream import quantize_to, resolve_device, resolve_dtype

CALIB = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))


def tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("spec", [dict(method="rtn"), dict(method="rtn", act="static"), dict(method="dgq", grid2=4),
                                  dict(method="dgq-gptq", grid2=4), dict(method="gptq"), dict(method="awq"),
                                  dict(method="smoothquant"), dict(method="dgq", act="static", smooth=True, grid2=4),
                                  dict(method="rtn", kv="int8-static"), dict(method="dgq", grid2=4, kv="int8-static"),
                                  dict(method="rtn", act="static", kv="int8-static"),
                                  dict(method="dgq", grid2=4, kv="int8-smooth"),
                                  dict(method="dgq-gptq", grid2=4, rotate="measured", rotate_residual=True)])
def test_streaming_equals_in_memory(tiny_hf_dir, tmp_path, spec):
    cfg = DGQConfig(group_size=32, **spec)
    model, tok = dgq.load_model(str(tiny_hf_dir))
    dgq.quantize(model, cfg, calib=CALIB, progress=False)
    dgq.save(model, tmp_path / "mem", tokenizer=tok)
    q = quantize_to(str(tiny_hf_dir), tmp_path / "stream", cfg, calib=CALIB, progress=False,
                    max_shard_size="30KB")
    a, b = tensors(tmp_path / "mem"), tensors(tmp_path / "stream")
    assert set(a) == set(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n
    assert len(list((tmp_path / "stream").glob("model-*-of-*.safetensors"))) > 2
    mem = json.loads((tmp_path / "mem" / "config.json").read_text())["quantization_config"]
    assert q["modules"] == mem["modules"] and q.get("kv_cache") == mem.get("kv_cache")
    with torch.no_grad():
        assert torch.equal(dgq.load(tmp_path / "stream")(IDS).logits, dgq.load(tmp_path / "mem")(IDS).logits)


def test_streaming_holds_one_block(tiny_hf_dir, tmp_path, monkeypatch):
    """While block i is quantized, every other block's weights (and the float linears it replaced) are on the meta
    device."""
    from dgq import stream

    seen = []
    orig = stream.BlockIO.load

    def load(self, i):
        orig(self, i)
        loaded = [j for j, b in enumerate(self.blocks) if not next(b.parameters()).is_meta]
        held = {int(n.split(".")[2]) for n, t in self.targets.items() if not t.module.weight.is_meta}
        rest = [n for n, p in self.model.named_parameters(remove_duplicate=False)
                if not n.startswith("model.layers.") and not p.is_meta]
        seen.append((i, loaded, sorted(held), rest))

    monkeypatch.setattr(stream.BlockIO, "load", load)
    quantize_to(str(tiny_hf_dir), tmp_path / "o", DGQConfig(method="dgq", group_size=32, grid2=4), calib=CALIB,
                progress=False)
    # the replaced float linears are released with their block; lm_head and the final norm (written first) before
    # calibrating, the embeddings once block 0's inputs are captured
    assert seen == [(0, [0], [0], ["model.embed_tokens.weight"]), (1, [1], [1], [])]


def test_bfloat16_source_dtype_and_devices(tiny_hf_dir, tmp_path):
    q = quantize_to(str(tiny_hf_dir), tmp_path / "bf16", DGQConfig(group_size=32), dtype="bfloat16", progress=False)
    assert q["streamed"]["dtype"] == "bfloat16"
    back = dgq.load(tmp_path / "bf16")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(back(IDS).logits.float()).all()
    assert resolve_dtype("auto", "bfloat16") == torch.bfloat16 and resolve_dtype("auto") == torch.float32
    assert resolve_device("cpu").type == "cpu"
    for bad, msg in (("float8", "is not one of"), ("tpu", "unknown device|runs on cpu or cuda")):
        with pytest.raises(DGQError, match=msg):
            resolve_dtype(bad) if bad == "float8" else resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(DGQError, match="no CUDA device; use --device cpu"):
            resolve_device("cuda")


def test_streaming_refuses_what_it_cannot_read(tiny_hf_dir, tmp_path):
    ck = dgq.save(dgq.quantize(dgq.load_model(str(tiny_hf_dir))[0], DGQConfig(group_size=32), progress=False),
                  tmp_path / "ck")
    with pytest.raises(DGQError, match="already a dgq checkpoint"):
        quantize_to(str(ck), tmp_path / "o", DGQConfig(group_size=32))
    with pytest.raises(DGQError, match="model not found"):
        quantize_to(str(tmp_path / "nope"), tmp_path / "o", DGQConfig(group_size=32))
    assert not (tmp_path / "o").exists()


def test_not_enough_disk_is_refused_before_starting(tiny_hf_dir, tmp_path, monkeypatch):
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DGQError, match=r"not enough free disk for the output: it needs about 0\.\d+ GB"):
        quantize_to(str(tiny_hf_dir), tmp_path / "o", DGQConfig(group_size=32), progress=False)
    assert not (tmp_path / "o").exists()


def test_a_block_that_does_not_fit_the_device_names_itself(tiny_hf_dir, monkeypatch):
    from dgq import stream

    source = stream.FolderSource(tiny_hf_dir)
    model = stream.skeleton(source, torch.float32, torch.device("cpu"))
    io = stream.BlockIO(model, source, None, torch.device("cuda", 0), torch.float32)
    monkeypatch.setattr(stream, "device_free_bytes", lambda d: 1000)
    with pytest.raises(DGQError, match=r"block 1 needs 0\.\d+ GiB on cuda:0 but only 0\.00 GiB are free; use "
                                       r"--device cpu"):
        io.load(1)


def test_interrupted_streaming_leaves_no_output(tiny_hf_dir, tmp_path, monkeypatch):
    from dgq import stream

    def boom(self, i):
        raise KeyboardInterrupt

    monkeypatch.setattr(stream.BlockIO, "done", boom)
    with pytest.raises(KeyboardInterrupt):
        quantize_to(str(tiny_hf_dir), tmp_path / "o", DGQConfig(method="dgq", group_size=32, grid2=4), calib=CALIB,
                    progress=False)
    assert list(tmp_path.iterdir()) == []


def test_weight_cache_off_gives_the_same_outputs_and_keeps_nothing(tiny_hf_dir, tmp_path):
    quantize_to(str(tiny_hf_dir), tmp_path / "q", DGQConfig(group_size=32), progress=False)
    cached, lean = dgq.load(tmp_path / "q"), dgq.load(tmp_path / "q", cache_weights=False)
    with torch.no_grad():
        assert torch.equal(cached(IDS).logits, lean(IDS).logits)
    kept = [m.kernel_cache for m in lean.modules() if isinstance(m, dgq.formats.QuantLinear)]
    assert kept and all(c == {} for c in kept)
    assert any(m.kernel_cache for m in cached.modules() if isinstance(m, dgq.formats.QuantLinear))


def test_alias_parts_joined_in_the_wrong_order_are_refused(tmp_path, monkeypatch):
    from dgq import models

    src = models.alias_gguf("smollm2-135m").read_bytes()[: 1 << 16]
    for i, chunk in enumerate((src[:30000], src[30000:]), 1):
        pkg = tmp_path / "site" / f"fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / "p.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DGQ_CACHE", str(tmp_path / "cache"))
    good = models.Alias((("fake_part1", "data/p.bin"), ("fake_part2", "data/p.bin")), ("a==1", "b==1"), len(src))
    swapped = models.Alias((("fake_part2", "data/p.bin"), ("fake_part1", "data/p.bin")), ("b==1", "a==1"), len(src))
    monkeypatch.setitem(models.ALIASES, "fake-good", good)
    monkeypatch.setitem(models.ALIASES, "fake-swapped", swapped)
    assert models.alias_gguf("fake-good").read_bytes() == src
    with pytest.raises(DGQError, match="not a GGUF file .*joined in the wrong order"):
        models.alias_gguf("fake-swapped")
    short = models.Alias(good.parts, good.pip, len(src) + 1)
    monkeypatch.setitem(models.ALIASES, "fake-short", short)
    with pytest.raises(DGQError, match="a part is truncated or missing"):
        models.alias_gguf("fake-short")
    monkeypatch.setitem(models.ALIASES, "fake-missing", models.Alias((("no_such_pkg_x", "d"),), ("x==1",)))
    with pytest.raises(DGQError, match="needs the package"):
        models.alias_gguf("fake-missing")


def test_streaming_a_tied_qwen2_with_biases_equals_in_memory(tmp_path):
    """Tied embeddings (no lm_head.weight in the files; SmolLM2 and Qwen2.5 are tied) and q/k/v biases."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tiny import COMMON

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**{**COMMON, "vocab_size": 256, "tie_word_embeddings": True}))
    src = tmp_path / "tied"
    model.save_pretrained(src)
    cfg = DGQConfig(method="dgq", group_size=32, grid2=4)
    model, _ = dgq.load_model(str(src))
    dgq.quantize(model, cfg, calib=CALIB, progress=False)
    dgq.save(model, tmp_path / "mem")
    quantize_to(str(src), tmp_path / "stream", cfg, calib=CALIB, progress=False, max_shard_size="30KB")
    a, b = tensors(tmp_path / "mem"), tensors(tmp_path / "stream")
    assert set(a) == set(b) and "lm_head.weight" not in a
    for n in a:
        assert torch.equal(a[n], b[n]), n
    with torch.no_grad():
        assert torch.equal(dgq.load(tmp_path / "stream")(IDS).logits, dgq.load(tmp_path / "mem")(IDS).logits)
