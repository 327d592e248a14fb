import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgq
from dgq import DGQConfig, DGQError
from dgq.checkpoint import WEIGHTS


@pytest.fixture
def ckpt(tiny_llama, tmp_path):
    dgq.quantize(tiny_llama, DGQConfig(group_size=32), progress=False)
    return dgq.save(tiny_llama, tmp_path / "ckpt"), tiny_llama


def test_config_carries_quantization_config(ckpt):
    path, model = ckpt
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "dgq" and q["format_version"] == 2 and q["group_size"] == 32
    assert q["checksums"]["model.safetensors"].startswith("sha256:")
    assert q["act"] == "dynamic" and len(q["modules"]) == 14
    assert not list(path.parent.glob(".ckpt.tmp-*"))


def _rewrite(path, fn):
    t = load_file(path / WEIGHTS)
    fn(t)
    save_file(t, path / WEIGHTS)


def test_missing_tensor(ckpt):
    path, _ = ckpt
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.down_proj.scales"))
    with pytest.raises(DGQError, match="does not match the checksum"):
        dgq.load(path)
    with pytest.raises(DGQError, match="tensor model.layers.1.mlp.down_proj.scales is missing"):
        dgq.load(path, verify=False)


def test_wrong_shape(ckpt):
    path, _ = ckpt
    bad = torch.zeros(3, 3, dtype=torch.int8)
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.zeros", bad))
    with pytest.raises(DGQError, match=r"model.layers.0.self_attn.q_proj.zeros has shape \(3, 3\)"):
        dgq.load(path, verify=False)


def test_newer_format_version(ckpt):
    path, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DGQError, match="format version 99, newer than this dgq reads"):
        dgq.load(path, verify=False)


def test_corrupt_weights_file(ckpt):
    path, _ = ckpt
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(DGQError, match="does not match the checksum"):
        dgq.load(path)
    with pytest.raises(DGQError, match="is unreadable"):
        dgq.load(path, verify=False)


def test_corrupt_codes_detected(ckpt):
    path, _ = ckpt

    def bad(t):
        t["model.layers.0.mlp.up_proj.scales"][0, 0] = 100  # codes no longer int8-safe for this scale
        t["model.layers.0.mlp.up_proj.qweight"][0, 0] = 0xFF
        t["model.layers.0.mlp.up_proj.zeros"][0, 0] = 0
    _rewrite(path, bad)
    with pytest.raises(DGQError, match="outside the int8-safe range"):
        dgq.load(path, verify=False)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(DGQError, match="checkpoint not found"):
        dgq.load(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DGQError, match="not a dgq checkpoint"):
        dgq.load(tmp_path)


def test_interrupted_save_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    dgq.quantize(tiny_llama, DGQConfig(group_size=32), progress=False)

    def boom(*a, **k):
        raise KeyboardInterrupt  # the user hits Ctrl-C while tensors are being written

    monkeypatch.setattr("dgq.checkpoint.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        dgq.save(tiny_llama, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_existing_and_unquantized(tiny_llama, tmp_path):
    with pytest.raises(DGQError, match="not quantized by dgq"):
        dgq.save(tiny_llama, tmp_path / "a")
    dgq.quantize(tiny_llama, DGQConfig(group_size=32), progress=False)
    dgq.save(tiny_llama, tmp_path / "a")
    with pytest.raises(DGQError, match="already exists"):
        dgq.save(tiny_llama, tmp_path / "a")
    dgq.save(tiny_llama, tmp_path / "a", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_quantize_twice_and_nan_weights_leave_model_unchanged(tiny_llama):
    w = tiny_llama.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w[3, 5] = float("inf")
    before = {n: type(m) for n, m in tiny_llama.named_modules()}
    with pytest.raises(DGQError, match=r"weight of model.layers.1.mlp.down_proj contains 1 NaN/Inf"):
        dgq.quantize(tiny_llama, DGQConfig(group_size=32), progress=False)
    assert {n: type(m) for n, m in tiny_llama.named_modules()} == before


def test_sharded_save_and_load(ckpt, tmp_path):
    path, model = ckpt
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dgq.load(path)(ids).logits
    out = dgq.save(model, tmp_path / "sharded", max_shard_size="40KB")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files) and index["metadata"]["total_size"] > 0
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(q["checksums"]) == {"config.json", *files}
    with torch.no_grad():
        assert torch.equal(dgq.load(out)(ids).logits, ref)
    shard = out / files[1]
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(DGQError, match=f"{files[1]} does not match the checksum"):
        dgq.load(out)
    with pytest.raises(DGQError, match=f"{files[1]} is unreadable"):
        dgq.load(out, verify=False)
    shard.unlink()
    with pytest.raises(DGQError, match=f"{files[1]} is missing"):
        dgq.load(out)


def test_shard_size_is_parsed():
    from dgq.checkpoint import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 5 * 10**8
    assert parse_size(123) == 123 and parse_size("40kb") == 40_000
    for bad in ("", "lots", "-1MB", 0):
        with pytest.raises(DGQError):
            parse_size(bad)
