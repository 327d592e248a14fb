"""The Triton A8W4 kernel against the reference semantics.

On the CPU these run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before triton is imported).
With ``DGQ_TEST_TRITON_NATIVE=1`` and a CUDA device they run the compiled kernels on the GPU instead.
"""

from __future__ import annotations

import os

NATIVE = os.environ.get("DGQ_TEST_TRITON_NATIVE") == "1"
if not NATIVE:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed")

from dgq import format as fmt  # noqa: E402
from dgq.kernels import triton_a8w4 as T  # noqa: E402
from dgq.kernels.reference import int32_accumulate  # noqa: E402
from dgq.nn import DGQLinear  # noqa: E402
from dgq.formats.act import epilogue, quantize_per_tensor, quantize_per_token  # noqa: E402

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
    codes = fmt.quantize_codes(w, ch, scales, zeros, g)
    return fmt.pack_uint4(codes), zeros, scales, ch.float()


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
    ref = int32_accumulate(x8, fmt.expand_int8(q, z, s, g))
    cands = T.candidates(m, n, k, g)
    kinds = {c.kind for c in cands}
    assert {"v1", "v2", "v3"} <= kinds and ("gemv" in kinds) == (m <= 16), kinds
    for cfg in cands:  # every candidate: factored v2 (split-K, swapped, unrolled), v1, v3 and the dp4a GEMV
        out = torch.full((m, n), -(2**31), dtype=torch.int32, device=DEV)  # poisoned
        got = T.a8w4_gemm_int32(*_dev(x8, q, z, s), g, out=out, config=cfg)
        assert torch.equal(got.cpu(), ref), cfg


V3_CONFIGS = [  # tile shapes / swap / split-K / multi-chunk steps beyond the candidate lists
    T.Config(16, 64, 128, SPLIT_K=2, SWAP=True, V3=True),
    T.Config(32, 64, 256, V3=True),
    T.Config(64, 32, 128, SWAP=True, V3=True),
    T.Config(1, 64, 256, SPLIT_K=2, GEMV=True),
    T.Config(4, 32, 128, SPLIT_K=4, GEMV=True),
    T.Config(16, 16, 128, GEMV=True),
]


@pytest.mark.parametrize("m", [1, 3, 16, 67, 256])
@pytest.mark.parametrize("g", [64, 128])
def test_v3_and_gemv_int32_bitwise(m, g):
    """The byte-SIMD kernels (GEMV: emulated dp4a here, the PTX path on the GPU) against the int32 reference."""
    gen = _gen()
    n, k = 96, 512
    q, z, s, _ = random_layer_tensors(n, k, g, gen)
    x8 = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    x8[0, :3] = torch.tensor([127, -127, -128 + 1])
    ref = int32_accumulate(x8, fmt.expand_int8(q, z, s, g))
    sc = T.pack_sc(z, s)
    cfgs = list(V3_CONFIGS) + [c for c in T.candidates(m, n, k, g) if c.kind in ("v3", "gemv")]
    if NATIVE:  # compiled run: fewer distinct kernels (each costs a compile); g = 64 extra tiles, g = 128 candidates
        cfgs = cfgs[:len(V3_CONFIGS)] if g == 64 else cfgs[len(V3_CONFIGS):]
    if m > 16:  # GEMV over several M tiles is legal (not a candidate there); keep one to cover the M masking
        cfgs = [c for c in cfgs if not c.GEMV or c.BM == 16]
    for cfg in cfgs:
        if NATIVE and cfg.GEMV:
            cfg = T.replace(cfg, ASM=True)  # the compiled run checks the inline-PTX (dp4a) path
        out = torch.full((m, n), -(2**31), dtype=torch.int32, device=DEV)  # poisoned
        got = T.a8w4_gemm_int32(*_dev(x8, q, z, s), g, out=out, config=cfg, sc=sc.to(DEV))
        assert torch.equal(got.cpu(), ref), cfg


def test_byte_simd_identity_exhaustive():
    """``((codes4 * s) + C) ^ 0x80808080`` with ``C = (128 - s*z) * 0x01010101`` gives the 4 bytes ``s*(q - z)``
    exactly for every s in 1..127, z in 0..15 and every int8-safe code (``safe_code_bounds``), in any byte lane and
    next to any other legal codes (32-bit wrap-around arithmetic, emulated in int64)."""
    s = torch.arange(1, 128).repeat_interleave(16)
    z = torch.arange(16).repeat(127)
    lo, hi = fmt.safe_code_bounds(z.to(torch.int8), s.to(torch.int8))
    q = torch.arange(16)
    legal = (q[None, :] >= lo[:, None]) & (q[None, :] <= hi[:, None])  # [2032, 16]
    assert legal[:, 0].any() and legal.sum(1).min() >= 1
    sc = T.pack_sc(z[:, None].to(torch.int8), s[:, None].to(torch.int8))  # [2, 1, 2032]
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
    if NATIVE and g > 256:
        pytest.skip("on a GPU the dispatch refuses g > 256: the v2 tile for g = 512 needs 262 KB of shared memory "
                    "(H100 limit 232 KB; measured 2026-11-26)")
    gen = _gen()
    m, n, k = 5, 64, 1024
    q, z, s, _ = random_layer_tensors(n, k, g, gen)
    x8 = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    ref = int32_accumulate(x8, fmt.expand_int8(q, z, s, g))
    for cfg in T.candidates(m, n, k, g, v1=False)[:2]:
        out = torch.full((m, n), -(2**31), dtype=torch.int32, device=DEV)
        assert torch.equal(T.a8w4_gemm_int32(*_dev(x8, q, z, s), g, out=out, config=cfg).cpu(), ref), cfg


def test_extreme_values_no_overflow():
    """Largest |x8| and |w8| everywhere (K = 11008-like depth scaled down): the factored sum stays exact."""
    gen = _gen()
    m, n, k, g = 3, 64, 1024, 128
    groups = k // g
    z = torch.zeros(n, groups, dtype=torch.int8)
    s = torch.full((n, groups), 127, dtype=torch.int8)
    codes = torch.ones(n, k, dtype=torch.uint8)  # w8 = 127
    codes[1::2] = 0  # z = 0, code 0 -> w8 = 0 on odd rows
    z[2::4] = 1
    codes[2::4] = 0  # w8 = -127
    q = fmt.pack_uint4(codes)
    x8 = torch.full((m, k), 127, dtype=torch.int8)
    x8[1] = -127
    x8[2] = torch.randint(-127, 128, (k,), generator=gen, dtype=torch.int8)
    ref = int32_accumulate(x8, fmt.expand_int8(q, z, s, g))
    for cfg in T.candidates(m, n, k, g)[:2]:
        assert torch.equal(T.a8w4_gemm_int32(*_dev(x8, q, z, s), g, config=cfg).cpu(), ref), cfg


@pytest.mark.parametrize("m,n,k,g", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_outputs_match_reference(m, n, k, g, dtype):
    gen = _gen()
    q, z, s, ch = random_layer_tensors(n, k, g, gen)
    bias = torch.randn(n, generator=gen) if m % 2 else None
    x8, sx = quantize_per_token(_x(m, k, gen))
    ref = epilogue(int32_accumulate(x8, fmt.expand_int8(q, z, s, g)), sx, ch, bias, torch.float32)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)  # poisoned
    cfg = T.candidates(m, n, k, g)[0]
    got = T.a8w4_gemm(*_dev(x8, sx, q, z, s, ch, bias), g, dtype, out=out, config=cfg).cpu()
    assert got.dtype == dtype
    assert not torch.isnan(got).any(), "output not fully written"
    eps = torch.finfo(dtype).eps  # the interpreter rounds fp32->bf16 by truncation: allow one ulp
    tol = ref.abs() * eps + (1e-6 if dtype == torch.float32 else torch.finfo(dtype).tiny)
    if dtype == torch.float32:  # fused multiply-add in the bias add may differ by an ulp or so
        tol = tol * 4 + 1e-6 * ref.abs().max()
    assert ((got.float() - ref).abs() <= tol).all()


def test_every_config_matches_within_rounding():
    gen = _gen()
    m, n, k, g = 5, 128, 512, 128
    q, z, s, ch = random_layer_tensors(n, k, g, gen)
    x8, sx = quantize_per_token(_x(m, k, gen))
    ref = epilogue(int32_accumulate(x8, fmt.expand_int8(q, z, s, g)), sx, ch, None, torch.float16)
    for cfg in T.candidates(m, n, k, g):
        got = T.a8w4_gemm(*_dev(x8, sx, q, z, s, ch), None, g, torch.float16, config=cfg).cpu()
        assert torch.equal(got, ref), cfg  # no bias: same float ops in the same order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 128), (7, 384), (33, 1000)])
def test_quantize_per_token_bitwise(m, k, dtype):
    gen = _gen()
    x = _x(m, k, gen, dtype)
    if m > 2:  # exact .5 ties after scaling: round half to even must match torch.round
        x[1, :4] = torch.tensor([127.0, 0.5, -1.5, 2.5], dtype=dtype)
    x8, s = quantize_per_token(x)
    x8t, st = T.quantize_per_token_triton(x.to(DEV))
    assert torch.equal(st.cpu(), s)
    assert torch.equal(x8t.cpu(), x8)
    if k % 128 == 0:
        x8p, _, rs = T.quantize_per_token_triton(x.to(DEV), permute=True, rowsum=True)
        assert torch.equal(x8p.cpu(), T.permute_activations(x8))
        assert torch.equal(rs.cpu(), T.rowsums(x8, permuted=False))
        assert torch.equal(T.rowsums(x8p.cpu(), permuted=True), T.rowsums(x8, permuted=False))


def test_quantize_per_tensor_bitwise():
    gen = _gen()
    x = _x(9, 256, gen) * 3
    scale = torch.tensor(0.037)
    x8, s = quantize_per_tensor(x, scale)
    x8t, st = T.quantize_per_tensor_triton(x.to(DEV), scale.to(DEV))
    assert torch.equal(x8t.cpu(), x8) and torch.equal(st.cpu(), s)


@pytest.mark.parametrize("act_mode", ["dynamic", "static"])
def test_layer_forward_matches_reference_kernel(act_mode):
    gen = _gen()
    n, k, g = 128, 256, 64
    q, z, s, ch = random_layer_tensors(n, k, g, gen)
    bias = torch.randn(n, generator=gen)
    layer = DGQLinear.from_tensors(q, z, s, ch, g, bias=bias, act_mode=act_mode, act_scale=0.02)
    x = _x(6, k, gen, torch.float16)
    from dgq.kernels.reference import ReferenceKernel

    ref = ReferenceKernel().forward(layer, x.float()).float()
    layer = layer.to(DEV)
    got = T.TritonKernel().forward(layer, x.to(DEV)).cpu().float()
    assert not torch.isnan(got).any()
    assert ((got - ref).abs() <= ref.abs() * torch.finfo(torch.float16).eps + 1e-4).all()


def test_dispatch_refuses_cpu_tensors():
    from dgq.kernels import explain, select

    gen = _gen()
    q, z, s, ch = random_layer_tensors(64, 128, 64, gen)
    layer = DGQLinear.from_tensors(q, z, s, ch, 64)
    x = torch.randn(2, 128)
    why = T.TritonKernel().refuse(layer, x)
    assert why is not None and "cpu" in why.lower()
    assert select(layer, x).name != "triton"
    assert "triton: refuses" in explain(layer, x)
    wo = DGQLinear.from_tensors(q, z, s, ch, 64, act_mode="none")
    assert "weight-only" in T.TritonKernel().refuse(wo, x)


def test_unsupported_group_size_is_refused_and_rejected():
    gen = _gen()
    q, z, s, ch = random_layer_tensors(8, 192, 32, gen)
    layer = DGQLinear.from_tensors(q, z, s, ch, 32)
    why = T.TritonKernel().refuse(layer, torch.randn(1, 192))
    assert why is not None
    with pytest.raises(ValueError, match="multiple of 128"):
        T.a8w4_gemm_int32(torch.zeros(1, 192, dtype=torch.int8), q, z, s, 32)
