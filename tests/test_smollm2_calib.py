"""DGQ calibration on the real SmolLM2-135M: exact smoothing, search vs RTN on real layers, end to end."""

import pytest
import torch

import dgq
from dgq import DGQConfig
from dgq.api import quantizable_linears
from dgq.arch import arch_for_config
from dgq.calib import calibrate, capture_block_inputs, collect_stats
from dgq.data import calibration_windows, read_text, tokenize
from dgq.quant.rtn import rtn_quantize
from dgq.quant.search import dgq_search, hessian, output_error

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return dgq.load_model(str(smollm2_dir))


def test_smoothing_keeps_the_function_on_real_blocks(smol):
    model, tok = smol
    calib = calibration_windows("squad-wiki", tok, 4, 128, seed=0)
    ids = tokenize(read_text("lambada"), tok)[:256].view(2, 128)
    with torch.no_grad():
        ref = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        log = calibrate(model, arch_for_config(model.config), quantizable_linears(model), calib,
                        DGQConfig(method="dgq", smooth=True).resolved(), None, progress=False)
        assert sum(len(b["smoothed"]) for b in log["blocks"]) >= 60  # real outliers get folded
        with torch.no_grad():
            out = model(ids).logits
        assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    finally:
        model.load_state_dict(state)


def test_search_never_worse_than_rtn_on_real_layers(smol):
    model, tok = smol
    arch = arch_for_config(model.config)
    calib = calibration_windows("squad-wiki", tok, 4, 256, seed=1)
    hidden, kwargs = capture_block_inputs(model, arch, calib)
    block = model.model.layers[0]
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"]
    stats, _ = collect_stats(block, names, hidden, kwargs[0], 256, 0, 0, "cpu")
    for n in names:
        w = block.get_submodule(n).weight.detach()
        h = hessian(stats[n].x())
        found = output_error(w, dgq_search(w, h, 64).dequantize(), h)
        for rounding in ("round", "ceil"):
            base = output_error(w, rtn_quantize(w, 64, rounding=rounding).dequantize(), h)
            assert (found <= base * (1 + 1e-6)).all(), n
            assert found.sum() < 0.95 * base.sum(), (n, rounding, found.sum().item(), base.sum().item())


def test_dgq_beats_rtn_end_to_end(smol, smollm2_dir):
    _, tok = smol
    ids = tokenize(read_text("lambada"), tok)[: 4 * 256]
    calib = calibration_windows("squad-wiki", tok, 8, 256, seed=0)
    ppl = {}
    for method in ("rtn", "dgq"):
        model, _ = dgq.load_model(str(smollm2_dir))
        cfg = DGQConfig(method=method, group_size=64, search_tokens=1024, grid2=8, refine=2)
        dgq.quantize(model, cfg, calib=calib if method == "dgq" else None, progress=False)
        ppl[method] = dgq.eval.perplexity.perplexity_of_ids(model, ids, 256, None, progress=False)["ppl"]
    assert ppl["dgq"] < ppl["rtn"], ppl
