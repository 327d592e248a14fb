"""Sibling fusion (dgq.fuse): q/k/v and gate/up run as one GEMM, with the same outputs and no extra memory."""

import pytest
import torch

import dgq
from dgq.formats import QuantLinear
from dgq.fuse import SiblingGroup, fuse_siblings, unfuse, why_not_fusable
from dgq.kernels.cpu import CpuIntMMKernel
from tiny import FAMILIES, make_tiny

EXPECTED_GROUPS = {"phi3": 0, "opt": 2}  # per model: phi3 already has fused qkv/gate_up linears; opt has no gate/up


def _quantized(family="llama", **cfg):
    m = make_tiny(family)
    dgq.quantize(m, dgq.DGQConfig(**{"method": "rtn", "group_size": 32, **cfg}), progress=False)
    return m


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def _storage_bytes(m) -> int:
    seen = {}
    for t in list(m.buffers()) + list(m.parameters()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for mod in m.modules():
        g = mod.__dict__.get("siblings")
        if g is not None and g.fused is not None:
            for t in g.fused.buffers():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_logits_bitwise_equal(family):
    m = _quantized(family)
    ids = torch.randint(0, 256, (2, 13))
    ref = _logits(m, ids)
    report = fuse_siblings(m)
    fused = [names for names, why in report if why is None]
    assert len(fused) == EXPECTED_GROUPS.get(family, 4)
    assert torch.equal(_logits(m, ids), ref)
    with torch.inference_mode():  # inference tensors: no version counter, identity only
        assert torch.equal(m(ids).logits, ref)
    assert fuse_siblings(m) == report  # idempotent


def test_one_gemm_per_group_and_no_extra_memory(monkeypatch):
    m = _quantized()
    ids = torch.randint(0, 256, (1, 9))
    calls = []
    orig = CpuIntMMKernel.forward

    def counting(self, layer, x):
        calls.append(layer.out_features)
        return orig(self, layer, x)

    monkeypatch.setattr(CpuIntMMKernel, "forward", counting)
    _logits(m, ids)
    assert len(calls) == 2 * 7
    before = _storage_bytes(m)
    fuse_siblings(m)
    calls.clear()
    _logits(m, ids)
    assert sorted(calls) == sorted([64 + 32 + 32, 64, 128 + 128, 64] * 2)  # qkv (GQA), o, gate+up, down
    attn = m.model.layers[0].self_attn
    fused = attn.q_proj.siblings.fused
    for name in ("qweight", "zeros", "scales", "channel_scale"):  # members are views of the fused tensors
        for mod in (attn.q_proj, attn.k_proj, attn.v_proj):
            assert getattr(mod, name).untyped_storage().data_ptr() == getattr(fused, name).untyped_storage().data_ptr()
    # the int8 weight the CPU kernel caches is now held once per group instead of once per member
    assert _storage_bytes(m) - before <= 0


def test_call_order_repeats_and_in_place_changes():
    m = _quantized()
    attn = m.model.layers[0].self_attn
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ref = {n: getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")}
        SiblingGroup([attn.q_proj, attn.k_proj, attn.v_proj])
        assert torch.equal(attn.k_proj(x), ref["k_proj"])  # any member may come first
        assert torch.equal(attn.k_proj(x), ref["k_proj"])  # asked twice: recomputed, still right
        assert torch.equal(attn.v_proj(x), ref["v_proj"])
        assert torch.equal(attn.q_proj(x), ref["q_proj"])
        q = attn.q_proj(x)
        x.mul_(2.0)  # modified in place between siblings: the kept output must not be reused
        unfused_k = attn.k_proj.siblings.fused(x)[..., 64:96]
        assert torch.equal(attn.k_proj(x), unfused_k)
        assert not torch.equal(attn.k_proj(x), ref["k_proj"]) and torch.equal(q, ref["q_proj"])
        y = attn.q_proj(x).view(3, 5, 4, 16)  # head reshapes work on the column views
        assert y.shape == (3, 5, 4, 16)


def test_reload_and_move_rebuild_the_fused_layer(tmp_path):
    m = _quantized()
    ids = torch.randint(0, 256, (1, 11))
    ref = _logits(m, ids)
    fuse_siblings(m)
    _logits(m, ids)
    dgq.save(m, tmp_path / "ck")  # members' buffers are views of one tensor: save must still work
    for fuse in (True, False):
        r = dgq.load(tmp_path / "ck", fuse=fuse)
        assert torch.equal(_logits(r, ids), ref)
        assert (r.model.layers[0].mlp.up_proj.__dict__.get("siblings") is not None) == fuse
    m._apply(lambda t: t.clone())  # every buffer gets new storage (what .to(device) does)
    assert torch.equal(_logits(m, ids), ref)
    k = m.model.layers[1].self_attn.k_proj
    assert k.qweight.untyped_storage().data_ptr() == k.siblings.fused.qweight.untyped_storage().data_ptr()
    sd = {n: t.clone() for n, t in k.state_dict().items()}
    sd["channel_scale"] *= 2
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = k(x)
        k.load_state_dict(sd)  # new values reach the fused layer
        assert torch.allclose(k(x), 2 * before)


def test_formats_and_refusals():
    ids = torch.randint(0, 256, (2, 7))
    for cfg, exact in (({"w_bits": 8}, True), ({"weights_only": True}, False), ({"act": "static"}, True)):
        calib = torch.randint(0, 256, (2, 16)) if cfg.get("act") == "static" else None
        m = make_tiny("llama")
        dgq.quantize(m, dgq.DGQConfig(method="rtn", group_size=32, **cfg), calib=calib, progress=False)
        ref = _logits(m, ids)
        assert all(why is None for _, why in fuse_siblings(m))
        got = _logits(m, ids)
        assert torch.equal(got, ref) if exact else torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    # static scales calibrated apart cannot share one quantized input
    m = make_tiny("llama")
    dgq.quantize(m, dgq.DGQConfig(method="rtn", group_size=32, act="static"), calib=torch.randint(0, 256, (2, 16)),
                 progress=False)
    attn = m.model.layers[0].self_attn
    attn.k_proj.act_scale.mul_(1.5)
    assert "act_scale" in why_not_fusable([attn.q_proj, attn.k_proj, attn.v_proj])
    report = dict((tuple(n), why) for n, why in fuse_siblings(m))
    assert "act_scale" in report[("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                  "model.layers.0.self_attn.v_proj")]
    with pytest.raises(ValueError, match="cannot fuse"):
        SiblingGroup([attn.q_proj])
    # members left unquantized (ignore list) run alone; the others still fuse when at least two remain
    m = make_tiny("llama")
    ignore = ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.v_proj"]
    dgq.quantize(m, dgq.DGQConfig(method="rtn", group_size=32, ignore=ignore), progress=False)
    ref = _logits(m, ids)
    report = dict((tuple(n), why) for n, why in fuse_siblings(m))
    assert report[("model.layers.0.mlp.gate_proj",)] == "fewer than two quantized members"
    assert report[("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj")] is None
    assert torch.equal(_logits(m, ids), ref)
    assert unfuse(m) == 3 and not any(isinstance(x, QuantLinear) and "siblings" in x.__dict__ for x in m.modules())
    assert torch.equal(_logits(m, ids), ref)


def test_load_state_dict_refreshes_cached_weights():
    """Derived weights (the CPU kernel's cached int8 weight, the fused layer) follow new values loaded in place."""
    m = _quantized()
    attn = m.model.layers[0].self_attn
    x = torch.randn(3, 64)
    donor = m.model.layers[1].self_attn
    with torch.no_grad():
        o_ref = donor.o_proj(x)
        attn.o_proj(x)  # caches the expanded int8 weight
        attn.o_proj.load_state_dict(donor.o_proj.state_dict())
        assert torch.equal(attn.o_proj(x), o_ref)
        k_ref = donor.k_proj(x)
        fuse_siblings(m)
        attn.k_proj(x)
        attn.k_proj.load_state_dict({n: t.clone() for n, t in donor.k_proj.state_dict().items()})
        assert torch.equal(attn.k_proj(x), k_ref)
        assert attn.k_proj.qweight.untyped_storage().data_ptr() == \
            attn.k_proj.siblings.fused.qweight.untyped_storage().data_ptr()


def test_torch_compile_traces_fused_models_without_graph_breaks():
    """Under torch.compile the members run alone (the group's Python-side reuse would break the graph)."""
    m = _quantized()
    ids = torch.randint(0, 256, (2, 9))
    ref = _logits(m, ids)
    fuse_siblings(m)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(m)(ids)
        assert explained.graph_break_count == 0, [str(r.reason)[:120] for r in explained.break_reasons]
        assert torch.equal(torch.compile(m, backend="eager")(ids).logits, ref)
    torch._dynamo.reset()


def test_deepcopy_and_threads():
    """A fused model deep-copies (the kept per-thread output is not copied) and runs from several threads at once
    (each thread keeps its own input/output, so one thread never gets another's slice)."""
    import copy
    import threading

    m = _quantized()
    fuse_siblings(m)
    xs = [torch.randint(0, 256, (1, 7 + i)) for i in range(4)]
    refs = [_logits(m, x) for x in xs]
    c = copy.deepcopy(m)
    assert torch.equal(_logits(c, xs[0]), refs[0])
    assert c.model.layers[0].self_attn.q_proj.siblings is not m.model.layers[0].self_attn.q_proj.siblings
    bad = []

    def work(j):
        for r in range(15):
            i = (j + r) % len(xs)
            if not torch.equal(_logits(m, xs[i]), refs[i]):
                bad.append((j, r))

    threads = [threading.Thread(target=work, args=(j,)) for j in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    # deterministic: what one thread keeps is invisible to another, and still there for itself
    attn = m.model.layers[0].self_attn
    x = torch.randn(2, 64)
    calls, step, back = [], threading.Event(), threading.Event()
    fused = attn.q_proj.siblings.layer()
    orig = fused.forward

    def counting(inp):
        calls.append(threading.current_thread().name)
        return orig(inp)

    def worker():
        with torch.no_grad():
            attn.q_proj(x)
            step.set()
            back.wait()
            attn.k_proj(x)

    fused.forward = counting  # this instance only
    try:
        t = threading.Thread(target=worker, name="worker")
        t.start()
        step.wait()
        with torch.no_grad():
            attn.k_proj(x)  # this thread kept nothing: computes
        back.set()
        t.join()
    finally:
        del fused.forward
    # worker q, then main k (it must not reuse the worker's output); the worker's k reused its own
    assert calls == ["worker", threading.current_thread().name]


def test_kept_output_is_dropped_when_weights_change_in_another_thread():
    import threading

    m = _quantized()
    fuse_siblings(m)
    attn, donor = m.model.layers[0].self_attn, m.model.layers[1].self_attn
    x = torch.randn(2, 64)
    with torch.no_grad():
        k_new = donor.k_proj(x)
    got, step, back = [], threading.Event(), threading.Event()

    def worker():
        with torch.no_grad():
            attn.q_proj(x)  # keeps the fused output, k and v pending
            step.set()
            back.wait()
            got.append(attn.k_proj(x))

    t = threading.Thread(target=worker)
    t.start()
    step.wait()
    attn.k_proj.load_state_dict({n: v.clone() for n, v in donor.k_proj.state_dict().items()})
    with torch.no_grad():
        attn.v_proj(torch.randn(2, 64))  # this thread rebuilds the fused layer meanwhile
    back.set()
    t.join()
    assert torch.equal(got[0], k_new)
