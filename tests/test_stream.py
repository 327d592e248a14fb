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
                                  dict(method="smoothquant"), dict(method="dgq", act="static", smooth=True, grid2=4)])
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
    assert q["modules"] == json.loads((tmp_path / "mem" / "config.json").read_text())["quantization_config"]["modules"]
    with torch.no_grad():
        assert torch.equal(dgq.load(tmp_path / "stream")(IDS).logits, dgq.load(tmp_path / "mem")(IDS).logits)


def test_streaming_holds_one_block(tiny_hf_dir, tmp_path, monkeypatch):
    """While block i is quantized, every other block's weights are on the meta device."""
    from dgq import stream

    seen = []
    orig = stream.BlockIO.load

    def load(self, i):
        orig(self, i)
        loaded = [j for j, b in enumerate(self.blocks) if not next(b.parameters()).is_meta]
        seen.append((i, loaded))

    monkeypatch.setattr(stream.BlockIO, "load", load)
    quantize_to(str(tiny_hf_dir), tmp_path / "o", DGQConfig(method="dgq", group_size=32, grid2=4), calib=CALIB,
                progress=False)
    assert seen == [(0, [0]), (1, [1])]


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
