"""The Triton A8W4 kernels (``_mma_kernel``, ``_dp4a_gemv_kernel``, the activation quantizer), the tuner and the
dispatch entry against the reference semantics.

On the CPU these run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before triton is imported).
With ``DGQ_TEST_TRITON_NATIVE=1`` and a CUDA device they run the compiled kernels on the GPU instead.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import replace

NATIVE = os.environ.get("DGQ_TEST_TRITON_NATIVE") == "1"
if not NATIVE:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed")

from dgq.formats.act import epilogue, quantize_per_tensor, quantize_per_token  # noqa: E402
from dgq.formats.dgq import DGQLinear, DGQWeight, expand_int8, quantize_codes, safe_code_bounds  # noqa: E402
from dgq.formats.packing import pack_uint4  # noqa: E402
from dgq.kernels import triton as TK  # noqa: E402
from dgq.kernels import triton_gemm as G  # noqa: E402
from dgq.kernels import triton_quant as Q  # noqa: E402
from dgq.kernels.reference import ReferenceKernel, int32_accumulate  # noqa: E402
from dgq.kernels.triton_tuner import Tuner, bucket  # noqa: E402

if NATIVE and not torch.cuda.is_available():
    pytest.skip("DGQ_TEST_TRITON_NATIVE=1 needs a CUDA device", allow_module_level=True)
DEV = "cuda" if NATIVE else "cpu"

SHAPES = [  # (M, N, K, group)
    (1, 64, 128, 64),
    (3, 192, 256, 128),
    (16, 128, 256, 64),
    (67, 64, 256, 128),
    (256, 128, 128, 64),
]


def _gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def random_layer_tensors(n: int, k: int, g: int, gen: torch.Generator):
    """Real format: random float W -> codes via quantize_codes with random valid zeros/scales (int8-safe)."""
    groups = k // g
    zeros = torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.int8)
    scales = torch.randint(1, 128, (n, groups), generator=gen, dtype=torch.int8)
    ch = torch.rand(n, generator=gen) * 0.02 + 1e-3
    w = torch.randn(n, k, generator=gen) * ch[:, None] * 8 * scales.float().repeat_interleave(g, 1)
    codes = quantize_codes(w, ch, scales, zeros, g)
    return pack_uint4(codes), zeros, scales, ch.float()


def _layer(q, z, s, ch, g, **kw):
    return DGQLinear.from_weight(DGQWeight(q, z, s, ch, g), **kw)


def _x(m, k, gen, dtype=torch.float32):
    x = torch.randn(m, k, generator=gen) * (torch.rand(m, 1, generator=gen) * 4 + 0.1)
    if m > 1:
        x[m // 2] = 0  # an all-zero token
    return x.to(dtype)


def _dev(*ts):
    return [t.to(DEV) if t is not None else None for t in ts]


@pytest.mark.parametrize("m,n,k,g", SHAPES)
def test_int32_accumulators_bitwise(m, n, k, g):
    gen = _gen()
    q, z, s, _ = random_layer_tensors(n, k, g, gen)
    x8 = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    ref = int32_accumulate(x8, expand_int8(q, z, s, g))
    cands = G.candidates(m, n, k, g)
    kinds = {c.kind for c in cands}
    assert "mma" in kinds and ("gemv" in kinds) == (m <= 16), kinds
    for cfg in cands:  # every candidate of the dispatch: tensor-core tiles (split-K, swapped) and the dp4a GEMV
        out = torch.full((m, n), -(2**31), dtype=torch.int32, device=DEV)  # poisoned
        got = G.a8w4_gemm_int32(*_dev(x8, q, z, s), g, out=out, config=cfg)
        assert torch.equal(got.cpu(), ref), cfg


EXTRA_CONFIGS = [  # tile shapes / swap / split-K / multi-chunk steps beyond the candidate lists
    G.Config("mma", 16, 64, 128, SPLIT_K=2, SWAP=True),
    G.Config("mma", 32, 64, 256),
    G.Config("mma", 64, 32, 128, SWAP=True),
    G.Config("gemv", 1, 64, 256, SPLIT_K=2),
    G.Config("gemv", 4, 32, 128, SPLIT_K=4),
    G.Config("gemv", 16, 16, 128),
]


@pytest.mark.parametrize("m", [1, 3, 16, 67, 256])
@pytest.mark.parametrize("g", [64, 128])
def test_mma_and_gemv_int32_bitwise(m, g):
    """Both kernels (GEMV: emulated dp4a here, the PTX path on the GPU) against the int32 reference."""
    gen = _gen()
    n, k = 96, 512
    q, z, s, _ = random_layer_tensors(n, k, g, gen)
    x8 = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    x8[0, :3] = torch.tensor([127, -127, -128 + 1])
    ref = int32_accumulate(x8, expand_int8(q, z, s, g))
    sc = G.pack_sc(z, s)
    cfgs = list(EXTRA_CONFIGS) + G.candidates(m, n, k, g)
    if NATIVE:  # compiled run: fewer distinct kernels (each costs a compile); g = 64 extra tiles, g = 128 candidates
        cfgs = cfgs[:len(EXTRA_CONFIGS)] if g == 64 else cfgs[len(EXTRA_CONFIGS):]
    if m > 16:  # GEMV over several M tiles is legal (not a candidate there); keep one to cover the M masking
        cfgs = [c for c in cfgs if c.kind != "gemv" or c.BM == 16]
    for cfg in cfgs:
        if NATIVE and cfg.kind == "gemv":
            cfg = replace(cfg, ASM=True)  # the compiled run checks the inline-PTX (dp4a) path
        out = torch.full((m, n), -(2**31), dtype=torch.int32, device=DEV)  # poisoned
        got = G.a8w4_gemm_int32(*_dev(x8, q, z, s), g, out=out, config=cfg, sc=sc.to(DEV))
        assert torch.equal(got.cpu(), ref), cfg


def test_byte_simd_identity_exhaustive():
    """``((codes4 * s) + C) ^ 0x80808080`` with ``C = (128 - s*z) * 0x01010101`` gives the 4 bytes ``s*(q - z)``
    exactly for every s in 1..127, z in 0..15 and every int8-safe code (``safe_code_bounds``), in any byte lane and
    next to any other legal codes (32-bit wrap-around arithmetic, emulated in int64)."""
    s = torch.arange(1, 128).repeat_interleave(16)
    z = torch.arange(16).repeat(127)
    lo, hi = safe_code_bounds(z.to(torch.int8), s.to(torch.int8))
    q = torch.arange(16)
    legal = (q[None, :] >= lo[:, None]) & (q[None, :] <= hi[:, None])  # [2032, 16]
    assert legal[:, 0].any() and legal.sum(1).min() >= 1
    sc = G.pack_sc(z[:, None].to(torch.int8), s[:, None].to(torch.int8))  # [2, 1, 2032]
    sv, cv = sc[0, 0].long(), sc[1, 0].long()
    # lane b holds code q (all 16, masked to legal ones); the other lanes hold the lowest / highest legal codes
    for b in range(4):
        for other in (lo, hi):
            codes = torch.stack([torch.full((2032, 16), -1, dtype=torch.long)] * 4, -1)
            for lane in range(4):
                codes[..., lane] = q[None, :] if lane == b else other[:, None].long()
            word = (codes * (256 ** torch.arange(4))).sum(-1)  # [2032, 16] packed codes
            v = ((word * sv[:, None] + cv[:, None]) & 0xFFFFFFFF) ^ 0x80808080
            got = torch.stack([((v >> (8 * i)) & 0xFF) for i in range(4)], -1)
            got = torch.where(got >= 128, got - 256, got)
            want = s[:, None, None] * (codes - z[:, None, None])
            ok = (got == want).all(-1)
            assert ok[legal].all(), (b, torch.nonzero(~ok & legal)[:5])
            assert (want[legal].abs() <= 127).all()
    # and C as stored is exactly (128 - s*z) * 0x01010101 modulo 2**32
    assert torch.equal((cv & 0xFFFFFFFF), ((128 - s * z) * 0x01010101) & 0xFFFFFFFF)


@pytest.mark.parametrize("g", [256, 512])
def test_int32_large_groups(g):
    """Groups longer than a K step (the dispatch refuses g > 256 on a GPU: not validated there)."""
    gen = _gen()
    m, n, k = 5, 64, 1024
    q, z, s, _ = random_layer_tensors(n, k, g, gen)
    x8 = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    ref = int32_accumulate(x8, expand_int8(q, z, s, g))
    cands = G.candidates(m, n, k, g)
    assert {c.kind for c in cands} == {"mma", "gemv"}
    for cfg in cands:
        out = torch.full((m, n), -(2**31), dtype=torch.int32, device=DEV)
        assert torch.equal(G.a8w4_gemm_int32(*_dev(x8, q, z, s), g, out=out, config=cfg).cpu(), ref), cfg


def test_extreme_values_no_overflow():
    """Largest |x8| and |w8| everywhere (K = 11008-like depth scaled down): the int32 sums stay exact."""
    gen = _gen()
    m, n, k, g = 3, 64, 1024, 128
    groups = k // g
    z = torch.zeros(n, groups, dtype=torch.int8)
    s = torch.full((n, groups), 127, dtype=torch.int8)
    codes = torch.ones(n, k, dtype=torch.uint8)  # w8 = 127
    codes[1::2] = 0  # z = 0, code 0 -> w8 = 0 on odd rows
    z[2::4] = 1
    codes[2::4] = 0  # w8 = -127
    q = pack_uint4(codes)
    x8 = torch.full((m, k), 127, dtype=torch.int8)
    x8[1] = -127
    x8[2] = torch.randint(-127, 128, (k,), generator=gen, dtype=torch.int8)
    ref = int32_accumulate(x8, expand_int8(q, z, s, g))
    for cfg in G.candidates(m, n, k, g) + G.candidates(64, n, k, g)[:1]:
        assert torch.equal(G.a8w4_gemm_int32(*_dev(x8, q, z, s), g, config=cfg).cpu(), ref), cfg


@pytest.mark.parametrize("m,n,k,g", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_outputs_match_reference(m, n, k, g, dtype):
    gen = _gen()
    q, z, s, ch = random_layer_tensors(n, k, g, gen)
    bias = torch.randn(n, generator=gen) if m % 2 else None
    x8, sx = quantize_per_token(_x(m, k, gen))
    ref = epilogue(int32_accumulate(x8, expand_int8(q, z, s, g)), sx, ch, bias, torch.float32)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)  # poisoned
    cfg = G.candidates(m, n, k, g)[0]
    got = G.a8w4_gemm(*_dev(x8, sx, q, z, s, ch, bias), g, dtype, out=out, config=cfg).cpu()
    assert got.dtype == dtype
    assert not torch.isnan(got).any(), "output not fully written"
    eps = torch.finfo(dtype).eps  # the interpreter rounds fp32->bf16 by truncation: allow one ulp
    tol = ref.abs() * eps + (1e-6 if dtype == torch.float32 else torch.finfo(dtype).tiny)
    if dtype == torch.float32:  # fused multiply-add in the bias add may differ by an ulp or so
        tol = tol * 4 + 1e-6 * ref.abs().max()
    assert ((got.float() - ref).abs() <= tol).all()


@pytest.mark.parametrize("m", [5, 40])
def test_every_config_matches_within_rounding(m):
    gen = _gen()
    n, k, g = 128, 512, 128
    q, z, s, ch = random_layer_tensors(n, k, g, gen)
    x8, sx = quantize_per_token(_x(m, k, gen))
    ref = epilogue(int32_accumulate(x8, expand_int8(q, z, s, g)), sx, ch, None, torch.float16)
    for cfg in G.candidates(m, n, k, g):
        got = G.a8w4_gemm(*_dev(x8, sx, q, z, s, ch), None, g, torch.float16, config=cfg).cpu()
        assert torch.equal(got, ref), cfg  # no bias: same float ops in the same order


def test_split_k_leaves_workspace_zeroed():
    """The last split of each tile re-zeroes its workspace tile and arrival counter (one launch, graph safe)."""
    gen = _gen()
    m, n, k, g = 3, 64, 1024, 128
    q, z, s, _ = random_layer_tensors(n, k, g, gen)
    x8 = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    ref = int32_accumulate(x8, expand_int8(q, z, s, g))
    tuner = Tuner(tune=False)
    for cfg in (G.Config("mma", 16, 64, 128, SPLIT_K=4, SWAP=True), G.Config("gemv", 4, 32, 128, SPLIT_K=8)):
        for _ in range(2):  # the second call reuses the workspace the first one left behind
            got = G.a8w4_gemm_int32(*_dev(x8, q, z, s), g, config=cfg, tuner=tuner)
            assert torch.equal(got.cpu(), ref), cfg
        ws, cnt = tuner.workspace(torch.device(DEV), m * n, 1)
        assert not ws.any() and not cnt.any(), cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 128), (7, 384), (33, 1000)])
def test_quantize_per_token_bitwise(m, k, dtype):
    gen = _gen()
    x = _x(m, k, gen, dtype)
    if m > 2:  # exact .5 ties after scaling: round half to even must match torch.round
        x[1, :4] = torch.tensor([127.0, 0.5, -1.5, 2.5], dtype=dtype)
    x8, s = quantize_per_token(x)
    x8t, st = Q.quantize_per_token_triton(x.to(DEV))
    assert torch.equal(st.cpu(), s)
    assert torch.equal(x8t.cpu(), x8)
    if k % 128 == 0:
        x8p, sp = Q.quantize_per_token_triton(x.to(DEV), permute=True)
        assert torch.equal(x8p.cpu(), G.permute_activations(x8)) and torch.equal(sp.cpu(), s)


@pytest.mark.parametrize("permute", [False, True])
def test_quantize_per_tensor_bitwise(permute):
    gen = _gen()
    x = _x(9, 256, gen) * 3
    scale = torch.tensor(0.037)
    x8, s = quantize_per_tensor(x, scale)
    x8t, st = Q.quantize_per_tensor_triton(x.to(DEV), scale.to(DEV), permute=permute)
    assert torch.equal(x8t.cpu(), G.permute_activations(x8) if permute else x8) and torch.equal(st.cpu(), s)


@pytest.mark.parametrize("act_mode", ["dynamic", "static"])
def test_layer_forward_matches_reference_kernel(act_mode):
    gen = _gen()
    n, k, g = 128, 256, 64
    q, z, s, ch = random_layer_tensors(n, k, g, gen)
    bias = torch.randn(n, generator=gen)
    layer = _layer(q, z, s, ch, g, bias=bias, act_mode=act_mode, act_scale=0.02)
    x = _x(6, k, gen, torch.float16)
    ref = ReferenceKernel().forward(layer, x.float()).float()
    layer = layer.to(DEV)
    kern = TK.TritonKernel()
    xd = x.to(DEV)
    got = kern.forward(layer, xd).cpu().float()
    assert not torch.isnan(got).any()
    assert ((got - ref).abs() <= ref.abs() * torch.finfo(torch.float16).eps + 1e-4).all()
    assert ("triton_sc", layer.zeros.device) in layer.kernel_cache  # the (s, C) plane is built once per layer
    assert kern.tuner.get(xd.device, 6, n, k, g) is not None


def test_dispatch_refuses_cpu_tensors():
    from dgq.kernels import explain, select

    gen = _gen()
    q, z, s, ch = random_layer_tensors(64, 128, 64, gen)
    layer = _layer(q, z, s, ch, 64)
    x = torch.randn(2, 128)
    why = TK.TritonKernel().refuse(layer, x)
    assert why is not None and "cpu" in why.lower()
    assert select(layer, x).name != "triton"
    assert "triton: refuses" in explain(layer, x)
    wo = _layer(q, z, s, ch, 64, act_mode="none")
    assert select(wo, x).name == "weight-only"


def test_unsupported_group_size_is_refused_and_rejected():
    gen = _gen()
    q, z, s, ch = random_layer_tensors(8, 192, 32, gen)
    layer = _layer(q, z, s, ch, 32)
    why = TK.TritonKernel().refuse(layer, torch.randn(1, 192))
    assert why is not None
    with pytest.raises(ValueError, match="multiple of 128"):
        G.a8w4_gemm_int32(torch.zeros(1, 192, dtype=torch.int8), q, z, s, 32)


def test_limits_need_no_gpu():
    lim = TK.TritonKernel.limits
    assert TK.CHUNK == G.CHUNK
    assert lim(4096, 128) is None and lim(11008, 64) is None and lim(512, 256) is None
    assert "multiple of 128" in lim(192, 64)
    assert "group size 512" in lim(4096, 512) and "group size 32" in lim(4096, 32)
    for k, g in [(4096, 64), (4096, 128), (4096, 256), (4096, 512), (384, 128)]:  # limits <= what the GEMM accepts
        assert lim(k, g) is not None or G.check_shapes(k, g) is None


@pytest.mark.parametrize("broken", [False, True])
def test_missing_or_broken_triton_is_a_refusal(monkeypatch, broken):
    """Without a usable triton the dispatch entry still imports and names the reason (the kernel modules are
    imported on first use)."""
    if broken:  # importable, but not a working triton (no ``jit``)
        fake = types.ModuleType("triton")
        fake.__path__ = []
        monkeypatch.setitem(sys.modules, "triton", fake)
        monkeypatch.setitem(sys.modules, "triton.language", types.ModuleType("triton.language"))
    else:
        monkeypatch.setitem(sys.modules, "triton", None)
        monkeypatch.delitem(sys.modules, "triton.language", raising=False)
    for mod in ("triton_gemm", "triton_quant"):
        monkeypatch.delitem(sys.modules, f"dgq.kernels.{mod}", raising=False)
        monkeypatch.delattr(sys.modules["dgq.kernels"], mod, raising=False)
    kern = TK.TritonKernel()
    assert kern._kernels() is None
    assert kern._unusable.startswith("triton is not usable" if broken else "triton is not installed")
    assert "\n" not in kern._unusable
    with pytest.raises(RuntimeError, match="triton is not"):
        kern.forward(None, torch.zeros(1, 128))


def test_tuner_cross_check_timing_and_save(monkeypatch, tmp_path):
    """Timed pick: a candidate that disagrees with the first working one or raises is dropped and logged; the
    fastest of the rest wins; save/load round-trips; ``DGQ_TRITON_TUNED`` is loaded once, a stale file is logged."""
    import triton.testing

    cands = [G.Config("gemv", 1, 64, 256), G.Config("mma", 16, 64, 128, SWAP=True),
             G.Config("gemv", 1, 32, 512), G.Config("mma", 16, 128, 128, SWAP=True)]
    outs = {cands[0]: torch.tensor([1, 2]), cands[1]: torch.tensor([1, 3]), cands[3]: torch.tensor([1, 2])}
    speed = {cands[0]: 2.0, cands[1]: 0.5, cands[3]: 1.0}
    current = []

    def run(c):
        current[:] = [c]
        if c not in outs:
            raise RuntimeError("does not compile")
        return outs[c]

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), speed[current[0]])[1])
    t = Tuner(tune=True)
    key = t.key("cuda:0", 3, 64, 256, 128)
    assert key == ("cuda:0", 4, 64, 256, 128) and bucket(3) == 4 and bucket(10**6) == 8192
    assert t.pick(key, cands, run, timed=True) == cands[3]  # cands[1] is faster but disagrees
    log = " ".join(str(v) for _, v in t.log)
    assert "DISAGREES" in log and "does not compile" in log
    assert [ms for _, ms in t.times[key]][-2:] == [float("inf")] * 2
    assert t.pick(key, cands, None, timed=True) == cands[3]  # cached: run is not called again
    assert Tuner(tune=False).pick(key, cands, None, timed=True) == cands[0]
    assert Tuner().pick(key, cands, None, timed=False) == cands[0]

    path = tmp_path / "tuned.json"
    t.save(str(path))
    t2 = Tuner()
    assert t2.load(str(path)) == 1 and t2.tuned == t.tuned
    monkeypatch.setenv("DGQ_TRITON_TUNED", str(path))
    t3 = Tuner()
    t3.load_env()
    assert t3.get("cuda:0", 3, 64, 256, 128) == cands[3]
    path.write_text('[[["cuda:0", 1, 64, 256, 128], {"BM": 1, "BN": 64, "BK": 256, "V3": true}]]')
    t4 = Tuner()
    t4.load_env()
    assert not t4.tuned and "not loaded" in str(t4.log)
