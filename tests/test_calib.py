"""DGQ calibration: exact smoothing folds, the search vs RTN, determinism, bad calibration input."""

import copy
import json

import pytest
import torch

import dgq
from dgq import DGQConfig, DGQError
from dgq.api import validate_model
from dgq.arch import arch_for_config, quantizable_linears
from dgq.calib import calibrate
from dgq.quant import smooth as sm
from tiny import FAMILIES, make_tiny


def test_baseline_and_factors():
    a = torch.ones(200)
    a[:3] = torch.tensor([50.0, 20.0, 4.0])  # C = 200: baseline = 2nd largest (floor(1 + 1.5) = 2)
    assert sm.baseline(a).item() == 20.0
    f = sm.smoothing_factors(a)
    assert f[0].item() == pytest.approx(2.5) and (f[1:] == 1).all()


def test_fold_norm_weight_with_offset():
    w = torch.randn(8)
    f = torch.rand(8) + 1
    for offset in (0.0, 1.0):
        new = sm.fold_norm_weight(w, f, offset)
        torch.testing.assert_close(offset + new, (offset + w) / f)


def _outlier_model(family):
    m = make_tiny(family, hidden_size=256, intermediate_size=512)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n and p.ndim == 1:
                p[:2] += 5.0  # outlier channels so every norm fold triggers
    return m


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_folds_exactly(family):
    m = _outlier_model(family)
    ids = torch.randint(0, 256, (4, 32))
    with torch.no_grad():
        ref = m(ids).logits
    cfg = dgq.methods.resolve(DGQConfig(method="dgq", smooth=True, group_size=32))
    log = calibrate(m, arch_for_config(m.config), validate_model(m, cfg), ids, cfg, dgq.methods.get("dgq"),
                    quantize=False, progress=False)
    assert sum(len(b["smoothed"]) for b in log["blocks"]) == 6  # norm->qkv, norm->mlp, up->down in both blocks
    with torch.no_grad():
        out = m(ids).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_nan_activation_names_block_and_layer():
    m = make_tiny("llama")
    with torch.no_grad():
        m.model.layers[1].post_attention_layernorm.weight[3] = float("inf")
    with pytest.raises(DGQError, match=r"NaN/Inf in the input activations of block 1 layer mlp\.(gate|up)_proj"):
        dgq.quantize(m, DGQConfig(method="dgq", group_size=32), calib=torch.randint(0, 256, (2, 16)),
                     progress=False)

    # rtn with static scales collects its scales in one whole-model pass: same check, model left as it was
    m = make_tiny("llama")
    with torch.no_grad():
        m.model.layers[1].post_attention_layernorm.weight[3] = float("inf")
    with pytest.raises(DGQError, match=r"NaN/Inf in the input activations of model\.layers\.1\.mlp\.(gate|up)_proj"):
        dgq.quantize(m, DGQConfig(method="rtn", group_size=32, act="static"), calib=torch.randint(0, 256, (2, 16)),
                     progress=False)
    assert all(isinstance(mod, torch.nn.Linear) for mod in quantizable_linears(m).values())


def test_same_seed_bitwise_identical_checkpoint(tmp_path):
    base = make_tiny("qwen2", hidden_size=128, intermediate_size=256)
    calib = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(3))
    paths = []
    for i in range(2):
        m = copy.deepcopy(base)
        dgq.quantize(m, DGQConfig(method="dgq", group_size=32, act="static", seed=7), calib=calib, progress=False)
        paths.append(dgq.save(m, tmp_path / f"run{i}"))
    from safetensors.torch import load_file

    a, b = (load_file(p / "model.safetensors") for p in paths)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert (paths[0] / "model.safetensors").read_bytes() == (paths[1] / "model.safetensors").read_bytes()
    cfgs = [json.loads((p / "config.json").read_text()) for p in paths]
    for c in cfgs:  # wall times are metadata, the rest must match
        cal = c["quantization_config"]["calibration"]
        for key in ("seconds", "capture_seconds"):
            cal.pop(key)
        for b in cal["blocks"]:
            b.pop("seconds")
        c["quantization_config"]["checksums"].pop("config.json")  # a digest of the content, wall times included
    assert cfgs[0] == cfgs[1]  # the weights' checksums too
    q = cfgs[0]["quantization_config"]
    assert q["recipe"]["method"] == "dgq" and q["act"] == "static"
    layers = q["calibration"]["blocks"][0]["linears"]
    assert set(layers) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert all({"w4", "a8w4", "a8"} <= set(v) for v in layers.values())
    loaded = dgq.load(paths[0])
    assert all(float(m.act_scale) > 0 for m in loaded.modules() if isinstance(m, dgq.DGQLinear))


def test_dgq_needs_calibration():
    with pytest.raises(DGQError, match="needs calibration data"):
        dgq.quantize(make_tiny("llama"), DGQConfig(method="dgq", group_size=32), progress=False)


def test_token_hessian_weights_every_token_equally():
    from dgq.calib import LinearStats

    x = torch.randn(64, 16)
    x[3] *= 1000.0  # a massive-activation token dominates xᵀx, not x̂ᵀx̂
    st = LinearStats()
    st.samples = [x[:32], x[32:]]
    xn = x / x.norm(dim=1, keepdim=True)
    assert torch.allclose(st.token_hessian(), xn.T @ xn / 64, atol=1e-6)
    assert torch.allclose(st.hessian(), x.T @ x / 64, rtol=1e-5)
    full = LinearStats()
    full.add_full(x)  # plain Hessian only: asking for the token-weighted one is an error, not a silent fallback
    with pytest.raises(DGQError, match="token-weighted"):
        full.token_hessian()
    full.add_full(x, token=True)
    assert torch.allclose(LinearStats(h_tok=(xn.T @ xn).double(), h_count=64).token_hessian(), xn.T @ xn / 64)


def test_candidates_expand_per_call_while_calibrating(monkeypatch):
    """Calibration runs the candidates without caching their expanded weights (memory: one float block, not a block
    plus an int8/float32 copy per candidate); the chosen layers cache again afterwards."""
    from dgq import calib as calib_mod
    from dgq.formats import QuantLinear

    seen = []
    orig = calib_mod.run_block

    def run_block(block, hidden, kwargs, device, **kw):
        out = orig(block, hidden, kwargs, device, **kw)
        layers = [m for m in block.modules() if isinstance(m, QuantLinear)]
        if layers:
            seen.append(all(not m.cache_weights and not m.kernel_cache for m in layers))
        return out

    monkeypatch.setattr(calib_mod, "run_block", run_block)
    model = make_tiny("llama")
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    dgq.quantize(model, DGQConfig(method="dgq-gptq", group_size=32, grid2=4), calib=calib, progress=False)
    assert seen and all(seen)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(m.cache_weights and not m.kernel_cache for m in layers)


@pytest.mark.parametrize("method", ["dgq", "dgq-gptq"])
def test_hessians_are_released_once_their_linears_are_made(monkeypatch, method):
    """Memory: when a block's later linear (down_proj) is made, the K×K Hessians of the inputs whose linears are
    all made are gone (only the input still being consumed holds one); asking for a released one is an error,
    never a silent recomputation from the samples."""
    from dgq import calib as calib_mod

    held, seen = [], []
    orig = calib_mod.make_layers

    def make_layers(method_, lin, name, group_size, stats, config):
        if name.endswith("q_proj"):
            seen.clear()  # a new block
        if name.endswith("down_proj"):
            held.append([st for st in seen if st is not stats and not st.released])
        seen.append(stats)
        return orig(method_, lin, name, group_size, stats, config)

    monkeypatch.setattr(calib_mod, "make_layers", make_layers)
    model = make_tiny("llama")
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = make_tiny("llama")
    dgq.quantize(model, DGQConfig(method=method, group_size=32, grid2=4), calib=calib, progress=False)
    assert held and all(h == [] for h in held)  # down_proj's own Hessian is computed inside make_layers
    monkeypatch.setattr(calib_mod, "make_layers", orig)
    dgq.quantize(ref, DGQConfig(method=method, group_size=32, grid2=4), calib=calib, progress=False)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    st = calib_mod.LinearStats(samples=[torch.randn(4, 8)])
    st.hessian()
    st.release_hessians()
    with pytest.raises(RuntimeError, match="after release_hessians"):
        st.hessian()


def test_search_in_row_chunks_matches_the_whole_search(monkeypatch):
    """Large weights are searched in row chunks (bounded temporaries); every choice is per channel, so the result
    is the one-piece search's (tested with a small chunk on an odd row count: the last chunk is partial)."""
    from dgq.quant import search

    g = torch.Generator().manual_seed(0)
    w = torch.randn(203, 256, generator=g) * 0.05
    w[::7, :3] *= 20  # outlier weights: channels where the clip ratio and RTN alternatives differ
    x = torch.randn(512, 256, generator=g)
    x[:, 5] *= 30
    h = search.hessian(x)
    grids = {"grid1": search.default_grid1(5), "grid2": search.default_grid2(9)}
    whole = search.dgq_search(w, h, 64, **grids)
    monkeypatch.setattr(search, "CHUNK_ELEMENTS", 50 * 256)  # chunks of 50 rows: 4 full + 1 of 3
    chunked = search.dgq_search(w, h, 64, **grids)
    for f in ("qweight", "zeros", "scales", "channel_scale"):
        torch.testing.assert_close(getattr(chunked, f), getattr(whole, f), rtol=0, atol=0)


@pytest.mark.parametrize("method,act", [("dgq", "dynamic"), ("dgq", "static"), ("dgq-gptq", "dynamic")])
def test_measured_smoothing_keeps_the_fold_it_measured_better(monkeypatch, method, act):
    """smooth="measured": each fold is judged by the consumers quantized with the method itself, with and without
    it; the layers of the kept option are reused (not made again). The result equals folding exactly the kept
    mappings and quantizing from scratch, bitwise."""
    from safetensors.torch import save

    import dgq.calib as calib_mod

    base = _outlier_model("llama")
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    m = copy.deepcopy(base)
    made_calls = []
    real_make = calib_mod.make_layers
    monkeypatch.setattr(calib_mod, "make_layers", lambda *a, **k: made_calls.append(a[2]) or real_make(*a, **k))
    cheap = {"grid1": 4, "grid2": 4, "refine": 0, "search_tokens": 64}  # the decisions, not the search, are tested
    dgq.quantize(m, DGQConfig(method=method, group_size=32, act=act, smooth="measured", **cheap), calib=ids,
                 progress=False)
    log = m.dgq_config["calibration"]["blocks"]
    decisions = [(b["block"], src, d["kept"]) for b in log for src, d in b["selective"].items()]
    assert len(decisions) == 2 * 3  # norm->qkv, norm->mlp, up->down in both blocks
    if (method, act) == ("dgq", "dynamic"):  # both kinds of decision occur here: both paths are exercised
        assert {kept for *_, kept in decisions} == {True, False}
    for b in log:
        for d in b["selective"].values():
            assert d["kept"] == (d["error_on"] < d["error_off"]) and d["error_on"] > 0 and d["error_off"] > 0
    # each consumer made twice (without and with its fold), o_proj (no mapping here) once, and a quantized source
    # (up_proj) once more when its rows were folded
    refolds = sum(1 for _, src, kept in decisions if src == "mlp.up_proj" and kept)
    assert len(made_calls) == 2 * (2 * 6 + 1) + refolds

    # reference: the same folds forced (the others skipped) and every layer quantized from scratch
    monkeypatch.setattr(calib_mod, "make_layers", real_make)
    queue = list(decisions)
    meth = dgq.methods.get(method)
    real_smoothing = type(meth).smoothing

    def forced(self, spec, block, stats, config, group_size):
        _, src, kept = queue.pop(0)
        assert src == spec.src
        f, info = real_smoothing(self, spec, block, stats, config, group_size)
        return (f if kept else torch.ones_like(f)), info

    monkeypatch.setattr(type(meth), "smoothing", forced)
    ref = copy.deepcopy(base)
    dgq.quantize(ref, DGQConfig(method=method, group_size=32, act=act, smooth=True, **cheap), calib=ids,
                 progress=False)
    assert queue == []
    got, want = m.state_dict(), ref.state_dict()
    assert save({k: v.contiguous() for k, v in got.items()}) == save({k: v.contiguous() for k, v in want.items()})


def test_activations_beyond_the_budget_are_memory_mapped_with_the_same_result(tmp_path, monkeypatch):
    """act_budget: activations larger than the budget live in memory-mapped files (unlinked at once: nothing is
    left in act_dir); the quantized model is bitwise the in-memory one. Bad budgets and a missing folder are
    refused."""
    import dgq.calib as calib_mod

    base = make_tiny("llama")
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    cfg = DGQConfig(method="dgq", group_size=32, grid1=4, grid2=4)
    ram, disk = copy.deepcopy(base), copy.deepcopy(base)
    dgq.quantize(ram, cfg, calib=ids, progress=False)
    mapped = []
    real_from_file = torch.from_file
    monkeypatch.setattr(calib_mod.torch, "from_file", lambda *a, **k: mapped.append(a[0]) or real_from_file(*a, **k))
    dgq.quantize(disk, cfg, calib=ids, progress=False, act_budget=1e-6, act_dir=tmp_path)  # block inputs, then
    # per block its float and quantized outputs: all memory-mapped (1 kB budget)
    assert len(mapped) >= 1 + 2 * 2 and all(str(p).startswith(str(tmp_path)) for p in mapped)
    assert list(tmp_path.iterdir()) == []
    a, b = ram.state_dict(), disk.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for bad, msg in [(0, "positive"), (-1.0, "positive")]:
        with pytest.raises(DGQError, match=msg):
            dgq.quantize(copy.deepcopy(base), cfg, calib=ids, progress=False, act_budget=bad)
    with pytest.raises(DGQError, match="does not exist"):
        dgq.quantize(copy.deepcopy(base), cfg, calib=ids, progress=False, act_budget=1e-6,
                     act_dir=tmp_path / "missing")
