import pytest
import torch

import dgq
from dgq import DGQConfig, DGQError, DGQLinear
from dgq.arch import quantizable_linears
from tiny import FAMILIES, make_tiny


@pytest.mark.parametrize("family", FAMILIES)
def test_family_quantize_save_load_same_logits(family, tmp_path):
    model = make_tiny(family)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    names = list(quantizable_linears(model))
    per_block = len(names) // model.config.num_hidden_layers
    assert per_block in (4, 6, 7)
    dgq.quantize(model, DGQConfig(group_size=32), progress=False)
    assert all(isinstance(model.get_submodule(n), DGQLinear) for n in names)
    with torch.no_grad():
        q = model(ids).logits
    rel = ((q - ref).norm() / ref.norm()).item()
    assert rel < 0.35, f"{family}: quantized logits too far from float ({rel:.3f})"
    out = dgq.save(model, tmp_path / "ckpt")
    loaded = dgq.load(out)
    with torch.no_grad():
        q2 = loaded(ids).logits
    assert torch.equal(q, q2)


def test_gqa_shapes_kept(tiny_llama):
    dgq.quantize(tiny_llama, DGQConfig(group_size=32), progress=False)
    attn = tiny_llama.model.layers[0].self_attn
    assert attn.q_proj.out_features == 64 and attn.k_proj.out_features == 32 and attn.v_proj.out_features == 32


def test_unsupported_architecture_lists_supported():
    from transformers import AutoModelForCausalLM, GPT2Config

    m = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(DGQError, match="unsupported architecture 'gpt2'.*llama.*opt.*qwen3"):
        dgq.quantize(m, DGQConfig(group_size=32), progress=False)
