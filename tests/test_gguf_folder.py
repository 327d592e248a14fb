"""GGUF -> Hugging Face folder, one tensor at a time (dgq.gguf_folder): bitwise what transformers' own GGUF loader
gives (``from_pretrained(gguf_file=...)``, float32) and ``save_pretrained`` writes, for tiny random GGUFs written
with gguf's writer in several tensor types (a Llama with llama.cpp's q/k permutation, a Qwen2 with q/k/v biases and
tied embeddings) and for the real SmolLM2 (slow); bad files refused with one line and nothing left behind; ``dgq
quantize FILE.gguf`` quantizes the cached folder block by block, bitwise what quantizing in memory gives."""

import gc
import json
import os
import weakref

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dgq
from dgq import DGQConfig, DGQError, gguf_folder, models
from dgq.cli import main
from tiny import GGUF_VOCAB, make_tiny, write_tiny_gguf

Q = gguf.GGMLQuantizationType
IDS = torch.randint(3, GGUF_VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def llama_types(name):
    """Every block type gguf quantizes on 32-blocks, F16, and F32 for the norms."""
    for part, q in ((".attn_q.", Q.Q4_0), (".attn_k.", Q.Q8_0), (".attn_v.", Q.Q5_0), (".attn_output.", Q.Q4_1),
                    (".ffn_gate.", Q.Q5_1), (".ffn_up.", Q.BF16), (".ffn_down.", Q.F16), ("token_embd", Q.Q8_0),
                    ("output.", Q.Q4_0)):
        if part in name:
            return q
    return None


def qwen2_types(name):
    """Q8_0 weights (the biases stay F32, as llama.cpp writes them), Q4_1 tied embeddings."""
    if name.endswith(".bias") or "norm" in name:
        return None
    return Q.Q4_1 if name == "token_embd.weight" else Q.Q8_0


FAMILIES = {"llama": llama_types, "qwen2": qwen2_types}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-src")
    out = {}
    for fam, types in FAMILIES.items():
        (root / fam).mkdir()
        out[fam] = write_tiny_gguf(make_tiny(fam, vocab_size=GGUF_VOCAB), root / fam / "src.gguf", fam, types)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DGQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def folder_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def transformers_reference(path, out):
    """transformers' GGUF loader in float32 (its state dict) and what save_pretrained writes of it at ``out``."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    sd = {n: t.clone() for n, t in model.state_dict().items()}
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    return model, sd


def check_bitwise(folder, path, ref_dir):
    """The folder's tensors are the loader's state dict (a tied lm_head written once, as the embeddings), its
    config, generation config and tokenizer files what save_pretrained writes."""
    model, sd = transformers_reference(path, ref_dir)
    got = folder_tensors(folder)
    tied = model.config.tie_word_embeddings
    assert set(got) == set(sd) - ({"lm_head.weight"} if tied else set())
    for name, t in got.items():
        assert t.dtype == torch.float32 and sd[name].dtype == torch.float32, name
        assert torch.equal(t, sd[name]), name
    assert set(got) == set(folder_tensors(ref_dir))
    for f in sorted(p.name for p in ref_dir.iterdir() if not p.name.endswith(".safetensors")):
        if f.endswith(".json") or f.endswith(".jinja"):
            assert (folder / f).read_text() == (ref_dir / f).read_text(), f
    return model


@pytest.mark.parametrize("fam", FAMILIES)
def test_streamed_folder_is_bitwise_transformers_loader(ggufs, tmp_path, fam, monkeypatch):
    path = ggufs[fam]
    monkeypatch.setattr(gguf_folder, "CHUNK_ELEMENTS", 200)  # every matrix dequantized a few rows at a time
    types = {t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert len(types) >= (7 if fam == "llama" else 3)  # the file really holds quantized blocks
    folder = gguf_folder.convert(path, tmp_path / "out", max_shard_size="40KB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(folder_tensors(folder))
    model = check_bitwise(folder, path, tmp_path / "ref")
    if fam == "qwen2":
        assert model.config.tie_word_embeddings and "model.layers.0.self_attn.q_proj.bias" in folder_tensors(folder)
    else:
        assert not model.config.tie_word_embeddings
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # the folder is a normal HF folder
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert sorted(os.listdir(tmp_path)) == ["out", "ref"]  # no temporary folder left


def test_one_tensor_at_a_time(ggufs, tmp_path, monkeypatch):
    """Each tensor is written before the next is dequantized, and a written shard's tensors are freed."""
    reads, live, base = [], [], []

    real_dequantize = gguf.quants.dequantize

    def dequantize(data, qtype):
        reads.append(qtype)
        return real_dequantize(data, qtype)

    class Writer(gguf_folder.CheckpointWriter):
        def add(self, tensors):
            if not base:  # the calls before the first tensor: one zero block per type, probing support
                base.append(len(reads) - 1)
            assert len(reads) - base[0] == len(live) + 1  # read one, write it
            super().add(tensors)  # a shard per tensor: this writes the previous one
            (held,) = self.pending.values()
            live.append(weakref.ref(held))

        def _flush(self):
            super()._flush()
            gc.collect()
            alive = [r for r in live if r() is not None]
            assert not alive, f"{len(alive)} tensors of written shards are still held"

    monkeypatch.setattr(gguf.quants, "dequantize", dequantize)
    monkeypatch.setattr(gguf_folder, "CheckpointWriter", Writer)
    gguf_folder.convert(ggufs["llama"], tmp_path / "out", max_shard_size="1B")  # a shard per tensor
    assert len(live) == len(gguf.GGUFReader(ggufs["llama"]).tensors)


def test_quantize_a_gguf_block_by_block(ggufs, tmp_path, cache, capsys, monkeypatch):
    """``dgq quantize FILE.gguf`` converts it once into $DGQ_CACHE/models (keyed by path, size and mtime) and
    quantizes that folder block by block: bitwise what loading the GGUF and quantizing in memory gives."""
    path = ggufs["qwen2"]
    model, tok = dgq.load_model(str(path))
    dgq.quantize(model, DGQConfig(method="rtn", group_size=32), progress=False)
    dgq.save(model, tmp_path / "mem", tokenizer=tok)
    assert main(["quantize", str(path), "--out", str(tmp_path / "q"), "--method", "rtn", "--group-size", "32"]) == 0
    a, b = folder_tensors(tmp_path / "mem"), folder_tensors(tmp_path / "q")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    converted = models.gguf_cache_path(path)
    assert converted.parent == cache / "models" and (converted / "config.json").is_file()
    calls = []
    monkeypatch.setattr(models, "convert", lambda *a, **k: calls.append(a))
    assert models.model_folder(str(path)) == converted and not calls  # converted once
    os.utime(path, ns=(1, 1))  # a changed file is another key
    assert models.gguf_cache_path(path) != converted


def _bad(tmp_path, data: bytes):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    return p


def assert_nothing_left(cache, tmp_path):
    models_dir = cache / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir()), list(models_dir.iterdir())
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("cut", [3, 20, 2000, -100])
def test_truncated_or_wrong_gguf_is_refused(ggufs, tmp_path, cache, capsys, cut):
    data = ggufs["llama"].read_bytes()
    p = _bad(tmp_path, data[:cut])
    code = main(["quantize", str(p), "--out", str(tmp_path / "q"), "--method", "rtn"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert ("not a GGUF file" in err) if cut == 3 else ("truncated or corrupt" in err), err
    assert_nothing_left(cache, tmp_path)


def test_wrong_magic_is_refused(ggufs, tmp_path, cache, capsys):
    p = _bad(tmp_path, b"GGML" + ggufs["llama"].read_bytes()[4:])
    assert main(["quantize", str(p), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a GGUF file (it starts with b'GGML'" in err, err
    assert_nothing_left(cache, tmp_path)


def test_unsupported_tensor_type_is_refused(tmp_path, cache):
    """A tensor type gguf cannot dequantize (I32 here) is refused before anything is written."""
    model = make_tiny("llama", vocab_size=GGUF_VOCAB)
    p = tmp_path / "i32.gguf"
    write_tiny_gguf(model, p, "llama")
    r = gguf.GGUFReader(p)
    w = gguf.GGUFWriter(tmp_path / "x.gguf", "llama")  # the same file with one norm as int32
    for key, f in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            w.add_key_value(key, f.contents(), f.types[0], f.types[1] if len(f.types) > 1 else None)
    for t in r.tensors:
        a = np.array(t.data)
        w.add_tensor(t.name, a.astype(np.int32) if t.name == "output_norm.weight" else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DGQError, match="output_norm.weight is of type I32, which gguf cannot dequantize"):
        models.model_folder(str(tmp_path / "x.gguf"))
    assert_nothing_left(cache, tmp_path)


def test_missing_tensor_is_refused_and_nothing_is_left(tmp_path, cache):
    """A tensor the model needs is absent (found while writing: the temporary folder goes too)."""
    p = write_tiny_gguf(make_tiny("llama", vocab_size=GGUF_VOCAB), tmp_path / "m.gguf", "llama",
                        skip={"blk.1.ffn_down.weight"})
    with pytest.raises(DGQError, match=r"no tensor for model\.layers\.1\.mlp\.down_proj\.weight"):
        models.model_folder(str(p))
    assert_nothing_left(cache, tmp_path)


def test_not_enough_disk_is_refused_before_converting(ggufs, cache, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DGQError, match=r"not enough free disk for the float32 folder of src\.gguf: it needs about"):
        models.model_folder(str(ggufs["llama"]))
    assert_nothing_left(cache, tmp_path)


def test_a_file_that_is_not_a_gguf_is_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(DGQError, match="is a file but not a .gguf"):
        models.model_folder(str(tmp_path / "w.bin"))


@pytest.mark.slow
def test_smollm2_streamed_is_bitwise_transformers_loader(tmp_path):
    """The real SmolLM2-135M (Q4_1, Q6_K embeddings, llama.cpp's q/k permutation): the streamed folder holds exactly
    the tensors transformers' loader gives, so the alias folders converted either way hold the same weights."""
    path = models.alias_gguf("smollm2-135m")
    folder = gguf_folder.convert(path, tmp_path / "out")
    check_bitwise(folder, path, tmp_path / "ref")
