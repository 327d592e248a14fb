"""The per-head value rotation (``rotate``): exact folds in every family that has one, exact statistics, the
measured per-block decision, and bad input."""

import copy

import pytest
import torch

import dgq
from dgq import DGQConfig, DGQError
from dgq.arch import arch_for_config, get_blocks
from dgq.calib import LinearStats, head_dim, rotation_alternative
from dgq.quant import rotate as rot
from tiny import FAMILIES, make_tiny


@pytest.mark.parametrize("d", [1, 16, 64, 24])
def test_orthogonal_matrix_is_orthogonal_and_seeded(d):
    q = rot.orthogonal_matrix(d, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, rot.orthogonal_matrix(d, seed=3))
    if d in (16, 64):  # a Hadamard matrix with signs: every entry ±1/√d
        torch.testing.assert_close(q.abs(), torch.full((d, d), d ** -0.5, dtype=torch.float64))
        assert not torch.equal(q, rot.orthogonal_matrix(d, seed=4))


def test_rotations_of_rows_columns_and_grams_agree():
    q = rot.orthogonal_matrix(8, seed=0)
    r = torch.block_diag(*[q] * 3)
    w, x = torch.randn(24, 5, dtype=torch.float64), torch.randn(7, 24, dtype=torch.float64)
    torch.testing.assert_close(rot.rotate_rows(w, q), r @ w)
    torch.testing.assert_close(rot.rotate_columns(x, q), x @ r.T)
    torch.testing.assert_close(rot.rotate_gram(x.T @ x, q), r @ x.T @ x @ r.T)
    with pytest.raises(ValueError, match="whole number of heads"):
        rot.rotate_columns(torch.randn(3, 20), q)


def test_rotated_stats_are_the_stats_of_rotated_inputs():
    q = rot.orthogonal_matrix(16, seed=0)
    x = [torch.randn(10, 64) * torch.linspace(0.1, 30, 64), torch.randn(6, 64)]
    st = LinearStats()
    for xi in x:
        st.samples.append(xi)
        st.add_full(xi, token=True)
    want = LinearStats()
    for xi in x:
        xr = rot.rotate_columns(xi, q)
        want.samples.append(xr)
        want.add_full(xr, token=True)
    got = st.rotated(q)
    torch.testing.assert_close(got.x(), want.x(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.hessian(), want.hessian(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.token_hessian(), want.token_hessian(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_folds_exactly(family):
    """Every block's v/o pair replaced by its rotated float copy: the logits do not move (GQA, v biases, OPT)."""
    m = make_tiny(family)
    arch = arch_for_config(m.config)
    if arch.rotate is None:
        pytest.skip(f"{family}: no rotation in the arch table")
    with torch.no_grad():
        if family in ("qwen2", "opt"):
            assert m.get_submodule(f"{arch.blocks}.0.{arch.rotate[0]}").bias is not None
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
        ref = m(ids).logits
        for block in get_blocks(m, arch):
            stats = {n: LinearStats() for n in arch.rotate}
            for n, (lin, _) in rotation_alternative(block, arch, stats, head_dim(m.config), seed=0).items():
                parent, _, child = n.rpartition(".")
                setattr(block.get_submodule(parent), child, lin)
        torch.testing.assert_close(m(ids).logits, ref, rtol=1e-4, atol=1e-4)


_CHEAP = {"grid1": 4, "grid2": 4, "refine": 0, "search_tokens": 64, "group_size": 32}


def _quantized(base, ids, **cfg):
    m = copy.deepcopy(base)
    dgq.quantize(m, DGQConfig(**{**_CHEAP, **cfg}), calib=ids, progress=False)
    return m


@pytest.mark.parametrize("method", ["dgq", "dgq-gptq"])
def test_measured_rotation_decides_per_block_by_its_block_error(method):
    """rotate="measured" runs the block both ways: block 0 (same inputs everywhere) logs the very errors that
    rotate="off" and rotate="on" get, keeps the rotation exactly when it is lower, and then equals that run."""
    base = make_tiny("qwen2")
    with torch.no_grad():  # a few large value channels, so o_proj's int8 inputs have outliers to spread
        for block in get_blocks(base, arch_for_config(base.config)):
            block.self_attn.v_proj.weight[::16] *= 12
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    runs = {r: _quantized(base, ids, method=method, rotate=r) for r in ("off", "on", "measured")}
    logs = {r: m.dgq_config["calibration"]["blocks"] for r, m in runs.items()}
    assert all("rotation" not in b for b in logs["off"])
    assert all(b["rotation"] == {"kept": True} for b in logs["on"])
    first = logs["measured"][0]["rotation"]
    assert first["error_off"] == pytest.approx(logs["off"][0]["block_token_rel_error"], rel=1e-5)
    assert first["error_on"] == pytest.approx(logs["on"][0]["block_token_rel_error"], rel=1e-5)
    for b in logs["measured"]:
        assert b["rotation"]["kept"] == (b["rotation"]["error_on"] < b["rotation"]["error_off"])
    assert logs["measured"][0]["block_token_rel_error"] == pytest.approx(
        min(first["error_off"], first["error_on"]), rel=1e-5)
    kept = [b["rotation"]["kept"] for b in logs["measured"]]
    if len(set(kept)) == 1:  # every block decided alike: the whole model equals that run
        same = runs["on" if kept[0] else "off"]
        for (n, a), (_, b) in zip(runs["measured"].state_dict().items(), same.state_dict().items(), strict=True):
            assert torch.equal(a, b), n
    # the rotated model is the float model's function up to quantization (a wrong fold would be far off)
    with torch.no_grad():
        ref = base(ids).logits
        rel = {r: ((m(ids).logits - ref).norm() / ref.norm()).item() for r, m in runs.items()}
    assert rel["on"] < 2 * rel["off"] and rel["measured"] < 2 * rel["off"], rel


def test_rotated_checkpoint_round_trips(tmp_path):
    base = make_tiny("qwen2")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    m = _quantized(base, ids, method="dgq-gptq", rotate="on")
    dgq.save(m, tmp_path / "ckpt")
    back = dgq.load(tmp_path / "ckpt")
    assert back.dgq_config["recipe"]["rotate"] == "on"
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=1e-4, atol=1e-4)


def test_rotate_refuses_what_it_cannot_do():
    ids = torch.randint(0, 256, (2, 32))
    with pytest.raises(DGQError, match="rotate needs dynamic activations"):
        _quantized(make_tiny("llama"), ids, method="dgq", act="static", rotate="measured")
    with pytest.raises(DGQError, match="need a calibrated method"):
        _quantized(make_tiny("llama"), ids, method="rtn", rotate="on")
    with pytest.raises(DGQError, match="rotate must be off, on or measured"):
        _quantized(make_tiny("llama"), ids, method="dgq", rotate="yes")
    # a family without a rotation in the arch table quantizes as with rotate="off"
    m = _quantized(make_tiny("phi3"), ids, method="dgq", rotate="measured")
    assert all("rotation" not in b for b in m.dgq_config["calibration"]["blocks"])


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_rotation_folds_exactly(family):
    """Embeddings, every block and lm_head in the rotated residual basis (norms folded, ties undone): the float
    logits do not move; families whose norms do not commute with it are left as they were."""
    from dgq.rotation import residual_matrix, rotate_residual_block, rotate_residual_globals

    m = make_tiny(family)
    arch = arch_for_config(m.config)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits
        before = {n: p.clone() for n, p in m.named_parameters()}
        tied = m.get_output_embeddings().weight is m.get_input_embeddings().weight
        if not rotate_residual_globals(m, arch, seed=0):
            assert arch.residual is None
            assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
            return
        assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight
        assert not m.config.tie_word_embeddings and (tied or family != "qwen2")
        q = residual_matrix(m.config, 0)
        for block in get_blocks(m, arch):
            rotate_residual_block(block, arch, q)
        torch.testing.assert_close(m(ids).logits, ref, rtol=1e-4, atol=1e-4)
        # the q/k/v weights really changed (not a no-op)
        name = f"{arch.blocks}.0.{arch.smooth[0].dsts[0]}.weight"
        assert (dict(m.named_parameters())[name] - before[name]).abs().max() > 1e-3


def test_residual_rotation_quantizes_saves_and_loads(tmp_path):
    """rotate_residual with a tied-embedding model: the checkpoint holds its own lm_head, says it is untied, loads
    back to the same logits, and is closer to the float model than without rotation on outlier inputs."""
    base = make_tiny("qwen2", hidden_size=128, intermediate_size=256)
    with torch.no_grad():  # massive residual channels, as real LLMs have
        base.model.embed_tokens.weight[:, :2] *= 40
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    m = _quantized(base, ids, method="dgq-gptq", rotate_residual=True)
    assert m.dgq_config["calibration"]["residual_rotation"] == {"size": 128, "seed": 0}
    dgq.save(m, tmp_path / "ckpt")
    back = dgq.load(tmp_path / "ckpt")
    assert not back.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=1e-4, atol=1e-4)
        ref = base(ids).logits
        plain = _quantized(base, ids, method="dgq-gptq", rotate_residual=False)
        err = {k: ((x(ids).logits - ref).norm() / ref.norm()).item() for k, x in (("rot", m), ("plain", plain))}
    assert err["rot"] < err["plain"], err
