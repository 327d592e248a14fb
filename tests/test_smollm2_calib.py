"""DGQ calibration on the real SmolLM2-135M: exact smoothing, search vs RTN on real layers, end to end."""

import pytest
import torch

import dgq
from dgq import DGQConfig
from dgq.api import validate_model
from dgq.arch import arch_for_config
from dgq.calib import calibrate, capture_block_inputs, collect_stats, run_block
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
        cfg = dgq.methods.resolve(DGQConfig(method="dgq", smooth=True, group_size=64))
        log = calibrate(model, arch_for_config(model.config), validate_model(model, cfg), calib, cfg,
                        dgq.methods.get("dgq"), quantize=False, progress=False)
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


def test_gptq_and_dgq_gptq_on_real_layers(smol):
    """Real SmolLM2 layers (block 3, full-token Hessian): GPTQ beats RTN W4, DGQ+GPTQ beats the DGQ search."""
    from dgq.methods.dgq_gptq import dgq_gptq_weight
    from dgq.methods.gptq import gptq_w4_weight
    from dgq.quant.peers import w4_rtn

    model, tok = smol
    arch = arch_for_config(model.config)
    calib = calibration_windows("squad-wiki", tok, 4, 256, seed=2)
    hidden, kwargs = capture_block_inputs(model, arch, calib)
    with torch.no_grad():
        for i in range(3):
            hidden = run_block(model.model.layers[i], hidden, kwargs[i], "cpu")
    block = model.model.layers[3]
    names = ["self_attn.v_proj", "mlp.down_proj"]
    stats, _ = collect_stats(block, names, hidden, kwargs[3], 64, 0, 3, "cpu", full_hessian=True)
    cfg = DGQConfig(method="dgq-gptq", group_size=64, grid2=8, refine=2)
    for n in names:
        w = block.get_submodule(n).weight.detach().float()
        h = stats[n].hessian()
        assert stats[n].h_count == 4 * 256
        gptq = output_error(w, gptq_w4_weight(w, h, 64, cfg).dequantize(), h).sum()
        rtn = output_error(w, w4_rtn(w, 64).dequantize(), h).sum()
        assert gptq < 0.9 * rtn, (n, gptq.item(), rtn.item())
        both, plain = dgq_gptq_weight(w, h, 64, cfg)
        e_both, e_plain = output_error(w, both.dequantize(), h), output_error(w, plain.dequantize(), h)
        assert (e_both <= e_plain * (1 + 1e-6)).all() and e_both.sum() < 0.9 * e_plain.sum(), n
