"""The A8W4 GEMM kernels in Triton: 4-bit codes expanded to int8 in registers (4 weights per 32-bit word), then
int8 tensor-core dots (``_mma_kernel``) or, for decode, ``dp4a`` on int32 words (``_dp4a_gemv_kernel``).

``y = epilogue(x8 . expand(q, z, s_int)^T)`` with ``expand = s_int * (q - z)`` done per tile in registers (no int8
weight ever lands in global memory) and the float epilogue ``(acc * s_x[m]) * s_ch[n] (+ bias[n])`` in float32.
The layouts (permuted activations, the int32-word view of the saved codes, the per-layer (s, C) plane), the
byte-SIMD expansion and the split-K reduction are described in docs/gpu-kernel.md.

Config choice lives in :mod:`dgq.kernels.triton_tuner`; :func:`a8w4_gemm` takes an explicit ``config``, or a
``tuner`` that picks one per shape, or neither (the first candidate). The dispatch entry is
:class:`dgq.kernels.triton.TritonKernel`. Runs on the CPU only under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .triton_tuner import bucket

CHUNK = 128  # activation permutation granularity along K (fixed; tile BK is a multiple of it)
KINDS = ("mma", "gemv")  # Config.kind: the tensor-core kernel or the dp4a GEMV
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------------------
# jit helpers shared by both kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order (GROUP_M row-tiles share the column sweep, for L2 reuse): program id -> (pid_m, pid_n)."""
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@triton.jit
def _tile_rows_cols(pid_m, pid_n, M, N, BM: tl.constexpr, BN: tl.constexpr):
    """A tile's row/column offsets and their in-bounds (clamped) versions for addressing (rows as int64)."""
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    return offs_m, offs_n, tl.where(offs_m < M, offs_m, 0).to(tl.int64), tl.where(offs_n < N, offs_n, 0)


@triton.jit
def _split_range(pid_k, n_steps, SPLIT_K: tl.constexpr):
    """The K-loop steps ``[start, end)`` of split ``pid_k`` of ``SPLIT_K``."""
    per = tl.cdiv(n_steps, SPLIT_K)
    start = pid_k * per
    return start, tl.minimum(start + per, n_steps)


@triton.jit
def _zero_acc(BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr):
    """The int32 accumulator, ``[BN, BM]`` when the weight is on the MMA's M side (``SWAP``)."""
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.int32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.int32)
    return acc


@triton.jit
def _epilogue_store(acc, offs_m, offs_n, M, N, sx_ptr, sch_ptr, b_ptr, y_ptr, stride_ym,
                    HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr):
    """``(acc * s_x[m]) * s_ch[n] (+ bias[n])`` in float32, stored as ``y``'s dtype (or the raw int32 ``acc``)."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if OUT_INT32:
        tl.store(y_ptrs, acc, mask=mask)
    else:
        sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
        sch = tl.load(sch_ptr + offs_n, mask=offs_n < N, other=0.0)
        yv = acc.to(tl.float32) * sx[:, None]
        yv = yv * sch[None, :]
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            yv = yv + bias[None, :]
        tl.store(y_ptrs, yv.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_finish(acc, pid, offs_m, offs_n, M, N, sx_ptr, sch_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
                    BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                    OUT_INT32: tl.constexpr):
    """Split-K reduction (exact int32 atomics into a zeroed workspace + a per-tile arrival counter; the last split
    takes the sum, re-zeroes the workspace tile and the counter and writes the epilogue) or the plain epilogue."""
    if SPLIT_K > 1:
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=mask)
        tl.debug_barrier()
        cnt = tl.atomic_add(cnt_ptr + pid, 1)
        if cnt == SPLIT_K - 1:
            total = tl.atomic_xchg(ws_ptrs, tl.zeros([BM, BN], dtype=tl.int32), mask=mask)
            tl.atomic_xchg(cnt_ptr + pid, 0)
            _epilogue_store(total, offs_m, offs_n, M, N, sx_ptr, sch_ptr, b_ptr, y_ptr, stride_ym,
                            HAS_BIAS, OUT_INT32)
    else:
        _epilogue_store(acc, offs_m, offs_n, M, N, sx_ptr, sch_ptr, b_ptr, y_ptr, stride_ym, HAS_BIAS, OUT_INT32)


# ----------------------------------------------------------------------------------------------------------------
# byte-SIMD expansion: 4 int8 weights per 32-bit word
# ----------------------------------------------------------------------------------------------------------------
# The saved low-nibble-first ``qweight`` ``[N, K/2]`` uint8 is read as int32 words ``[N, K/8]`` (little endian).
# Byte b of word j holds code[8j + 2b] (low nibble) and code[8j + 2b + 1] (high nibble), so ``w & 0x0F0F0F0F`` = 4
# even-k codes, ``(w >> 4) & 0x0F0F0F0F`` = the 4 odd-k codes: the even/odd halves of the permuted activations (word
# j of a 128-chunk pairs with permuted columns 4j..4j+3 of the chunk's even half / odd half). Per (group, n) the
# pair ``(s, C = (128 - s*z) * 0x01010101 mod 2**32)`` (int32, :func:`pack_sc`) turns 4 codes into 4 int8 weights:
# ``((codes4 * s) + C) ^ 0x80808080`` (each byte of ``q*s + 128 - s*z`` lies in [1, 255] for int8-safe codes, so
# the 32-bit arithmetic is exact modulo 2**32).
_M4 = tl.constexpr(0x0F0F0F0F)
_SIGN = tl.constexpr(-0x7F7F7F80)  # 0x80808080 as int32


@triton.jit
def _expand4(w, s, c, HI: tl.constexpr):
    """4 int8 weights per int32 word (byte-SIMD): codes of the low (HI=False) or high nibbles."""
    if HI:
        w = w >> 4
    return ((w & _M4) * s + c) ^ _SIGN


@triton.jit
def _bytes(words, R: tl.constexpr, C: tl.constexpr):
    """int32 ``[R, C]`` -> int8 ``[R, 4C]`` (byte b of word c -> column 4c + b).

    The 4 copies of each word are made with ``tl.join`` (the joined dims are register-minor in Triton's layout), so
    each thread's 4 consecutive elements are the 4 bytes of one word and no data moves between threads; on sm_90
    this compiles to no instructions at all."""
    w4 = tl.join(tl.join(words, words), tl.join(words, words))  # [R, C, 2, 2]
    sh = tl.reshape(tl.arange(0, 4) * 8, (1, 1, 2, 2))
    return tl.reshape((w4 >> sh).to(tl.int8), (R, 4 * C))


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """``c + sum_i int8(a.byte_i) * int8(b.byte_i)`` elementwise on int32 words (inline PTX, or emulated)."""
    if ASM:
        out = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                        is_pure=True, pack=1)
    else:
        out = c
        for i in tl.static_range(4):
            out += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
    return out


@triton.jit
def _group_sc(sc_ptrs, g0, N, GSZ, BN: tl.constexpr, NG: tl.constexpr, RUN: tl.constexpr, W: tl.constexpr):
    """(s, C) as [BN, 1] (one group per step) or [BN, W] (NG groups per step, RUN word columns each)."""
    s0 = tl.load(sc_ptrs + g0 * N)
    c0 = tl.load(sc_ptrs + (GSZ + g0 * N))
    if NG > 1:
        jw = tl.arange(0, W)
        s2 = tl.broadcast_to(s0[:, None], (BN, W))
        c2 = tl.broadcast_to(c0[:, None], (BN, W))
        for i in tl.static_range(1, NG):
            si = tl.load(sc_ptrs + (g0 + i) * N)
            ci = tl.load(sc_ptrs + (GSZ + (g0 + i) * N))
            sel = (jw >= i * RUN)[None, :]
            s2 = tl.where(sel, si[:, None], s2)
            c2 = tl.where(sel, ci[:, None], c2)
    else:
        s2 = s0[:, None]
        c2 = c0[:, None]
    return s2, c2


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _mma_kernel(x_ptr, qw_ptr, sc_ptr, sx_ptr, sch_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                M, N, K, stride_xm, stride_qw, stride_ym,
                GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP: tl.constexpr,
                HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr):
    """Tensor-core GEMM: byte-SIMD weight expansion (``_expand4``), two int8 dots per K step (even/odd k halves of
    the permuted activations). ``SWAP`` puts the weight on the MMA's M side (decode tiles)."""
    QW: tl.constexpr = BK // 8  # weight words per row per step
    HALF: tl.constexpr = BK // 2
    NG: tl.constexpr = BK // GROUP if BK > GROUP else 1
    RUN: tl.constexpr = GROUP // 8  # word columns per group when NG > 1
    GSZ = (K // GROUP) * N
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(pid, M, N, BM, BN, GROUP_M)

    offs_m, offs_n, rm, rn = _tile_rows_cols(pid_m, pid_n, M, N, BM, BN)
    j = tl.arange(0, HALF)
    xcol = (j // 64) * 128 + (j % 64)  # permuted-activation column of each even-k tile column
    x_ptrs = x_ptr + rm[:, None] * stride_xm + xcol[None, :]
    q_ptrs = qw_ptr + rn.to(tl.int64)[:, None] * stride_qw + tl.arange(0, QW)[None, :]
    sc_ptrs = sc_ptr + rn

    kt0, kt1 = _split_range(pid_k, K // BK, SPLIT_K)
    acc = _zero_acc(BM, BN, SWAP)
    for kt in range(kt0, kt1):
        xl = tl.load(x_ptrs + kt * BK)
        xh = tl.load(x_ptrs + kt * BK + 64)
        w = tl.load(q_ptrs + kt * QW)
        s2, c2 = _group_sc(sc_ptrs, (kt * BK) // GROUP, N, GSZ, BN, NG, RUN, QW)
        wl = _bytes(_expand4(w, s2, c2, False), BN, QW)
        wh = _bytes(_expand4(w, s2, c2, True), BN, QW)
        if SWAP:
            acc = tl.dot(wl, tl.trans(xl), acc, out_dtype=tl.int32)
            acc = tl.dot(wh, tl.trans(xh), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(xl, tl.trans(wl), acc, out_dtype=tl.int32)
            acc = tl.dot(xh, tl.trans(wh), acc, out_dtype=tl.int32)
    if SWAP:
        acc = tl.trans(acc)
    _split_k_finish(acc, pid, offs_m, offs_n, M, N, sx_ptr, sch_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
                    BM, BN, SPLIT_K, HAS_BIAS, OUT_INT32)


@triton.jit
def _dp4a_gemv_kernel(x_ptr, qw_ptr, sc_ptr, sx_ptr, sch_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                      M, N, K, stride_xw, stride_qw, stride_ym,
                      GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      SPLIT_K: tl.constexpr, ASM: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
                      STAGES: tl.constexpr):
    """Decode GEMV without ``tl.dot``: 4-bit words streamed, byte-SIMD expansion, ``dp4a`` on int32 words
    (4 MACs per instruction) into a ``[BM, BN, BK/8]`` int32 accumulator, reduced once at the end; split-K.
    ``STAGES > 1`` software-pipelines the K loop (cp.async prefetch of the next ``STAGES - 1`` steps into shared
    memory), for the no-split full-K configs: latency hidden by prefetch instead of by atomics over splits."""
    QW: tl.constexpr = BK // 8
    NG: tl.constexpr = BK // GROUP if BK > GROUP else 1
    RUN: tl.constexpr = GROUP // 8
    GSZ = (K // GROUP) * N
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BN)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m, offs_n, rm, rn = _tile_rows_cols(pid_m, pid_n, M, N, BM, BN)
    jw = tl.arange(0, QW)
    xw = (jw // 16) * 32 + (jw % 16)  # x word (4 permuted int8) paired with the even-k half of weight word jw
    x_ptrs = x_ptr + rm[:, None] * stride_xw + xw[None, :]
    q_ptrs = qw_ptr + rn.to(tl.int64)[:, None] * stride_qw + jw[None, :]
    sc_ptrs = sc_ptr + rn

    kt0, kt1 = _split_range(pid_k, K // BK, SPLIT_K)
    acc3 = tl.zeros([BM, BN, QW], dtype=tl.int32)
    for kt in tl.range(kt0, kt1, num_stages=STAGES):
        w = tl.load(q_ptrs + kt * QW)
        xl = tl.load(x_ptrs + kt * (2 * QW))
        xh = tl.load(x_ptrs + (kt * (2 * QW) + 16))
        s2, c2 = _group_sc(sc_ptrs, (kt * BK) // GROUP, N, GSZ, BN, NG, RUN, QW)
        lo = _expand4(w, s2, c2, False)
        hi = _expand4(w, s2, c2, True)
        acc3 = _dp4a(tl.broadcast_to(xl[:, None, :], (BM, BN, QW)), tl.broadcast_to(lo[None, :, :], (BM, BN, QW)),
                     acc3, ASM)
        acc3 = _dp4a(tl.broadcast_to(xh[:, None, :], (BM, BN, QW)), tl.broadcast_to(hi[None, :, :], (BM, BN, QW)),
                     acc3, ASM)
    acc = tl.sum(acc3, axis=2)
    _split_k_finish(acc, pid, offs_m, offs_n, M, N, sx_ptr, sch_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
                    BM, BN, SPLIT_K, HAS_BIAS, OUT_INT32)


# ----------------------------------------------------------------------------------------------------------------
# tile configs and candidates
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One tile config of one kernel: ``kind`` "mma" (``_mma_kernel``, tensor cores) or "gemv"
    (``_dp4a_gemv_kernel``). ``BK``: natural k per loop step (a multiple of 128). ``SWAP`` (mma only): the weight
    on the MMA's M side. ``num_stages``: the GEMV's K-loop pipelining depth (``STAGES``) and Triton's stages for the
    mma kernel. ``ASM`` (gemv only): inline PTX ``dp4a`` instead of the pure-Triton equivalent (never under the
    interpreter)."""

    kind: str
    BM: int
    BN: int
    BK: int
    SPLIT_K: int = 1
    SWAP: bool = False
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    ASM: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Config.kind must be one of {KINDS}, got {self.kind!r}")


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _fits(c: Config, k: int, g: int) -> bool:
    if c.BK % CHUNK:
        return False
    return k % c.BK == 0 and (g % c.BK == 0 or (c.BK % g == 0 and c.BK // g <= 4))


def _with_split(c: Config, m: int, n: int, k: int, sms: int, fill: int = 1) -> Config:
    """Split K so that about ``fill`` programs per SM run (decode / small M)."""
    tiles = triton.cdiv(m, c.BM) * triton.cdiv(n, c.BN)
    n_kt = k // c.BK
    split = 1
    while split * 2 <= n_kt and tiles * split * 2 <= fill * sms + sms // 2 and split < 32:
        split *= 2
    return replace(c, SPLIT_K=split)


def _gemv_configs(m: int, n: int, k: int, sms: int) -> list[Config]:
    """dp4a GEMV tiles for M <= 16: the ``[BM, BN, BK/8]`` accumulator stays at <= 32 registers a thread."""
    bm = bucket(max(m, 1))
    if bm > 16:
        return []
    shapes = {1: [(64, 256), (32, 512), (128, 128)], 2: [(64, 256), (32, 256)], 4: [(32, 256), (64, 128)],
              8: [(16, 256), (32, 128)], 16: [(16, 128), (8, 256)]}[bm]
    cs = [_with_split(Config("gemv", bm, bn, bk, ASM=True, num_warps=4, num_stages=1), m, n, k, sms, 8)
          for bn, bk in shapes]
    # no split-K, the loop software-pipelined (3 stages): no atomics, no workspace; few rows per program so that
    # N/BN programs fill the GPU (sm_90, triton 3.6: 32-48 registers, 3-6 KB shared memory, weight words prefetched
    # by LDGSTS; the tuner keeps them only if they win)
    piped = {1: [(8, 512), (16, 256), (8, 256)], 2: [(8, 256)], 4: [(8, 256)], 8: [(8, 128)], 16: [(8, 128)]}[bm]
    cs += [Config("gemv", bm, bn, bk, ASM=True, num_warps=4, num_stages=3) for bn, bk in piped]
    return cs


def candidates(m: int, n: int, k: int, g: int, sms: int = 132) -> list[Config]:
    """Tile configs worth trying for this problem, best guess first: at M <= 16 the dp4a GEMV tiles and one swapped
    split-K tensor-core tile; above, tensor-core tiles for the mid and the large-M regime."""
    if m <= 16:
        cs = _gemv_configs(m, n, k, sms)
        cs.append(_with_split(Config("mma", 16, 64, 128, SWAP=True, num_warps=4, num_stages=4), m, n, k, sms, 2))
    elif m <= 128:
        cs = [Config("mma", 64, 128, 128, num_warps=4, num_stages=4),
              Config("mma", 64, 64, 128, num_warps=4, num_stages=4),
              Config("mma", 128, 128, 128, num_warps=8, num_stages=3)]
    else:  # the byte extraction (``_bytes``) compiles to no instructions on sm_90
        cs = [Config("mma", 128, 128, 128, num_warps=8, num_stages=3),  # 118 regs, 84 KB smem: 2 CTAs/SM
              Config("mma", 256, 128, 128, num_warps=8, num_stages=3),
              Config("mma", 128, 256, 128, num_warps=8, num_stages=3),
              Config("mma", 64, 128, 128, num_warps=4, num_stages=4),  # 3 CTAs/SM
              Config("mma", 256, 128, 128, SWAP=True, num_warps=8, num_stages=3)]
    out, seen = [], set()
    for c in cs:
        if _INTERPRET and c.ASM:
            c = replace(c, ASM=False)  # the interpreter cannot run inline PTX
        if _fits(c, k, g) and c not in seen:
            seen.add(c)
            out.append(c)
    return out


# ----------------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------------
def permute_activations(x8: torch.Tensor) -> torch.Tensor:
    """Natural-order int8 activations -> the kernels' order (evens then odds inside each 128-wide chunk)."""
    m, k = x8.shape
    return x8.reshape(m, k // CHUNK, CHUNK // 2, 2).transpose(-1, -2).reshape(m, k).contiguous()


def pack_sc(zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[N, G]`` int8 zeros/scales -> int32 ``[2, G, N]``: ``s`` and ``C = (128 - s*z) * 0x01010101`` (mod 2**32,
    as int32) for the byte-SIMD expansion ``((codes4 * s) + C) ^ 0x80808080``."""
    s = scales.to(torch.int64)
    c = ((128 - s * zeros.to(torch.int64)) * 0x01010101) & 0xFFFFFFFF
    c = torch.where(c >= 2**31, c - 2**32, c)
    return torch.stack([s, c]).to(torch.int32).transpose(1, 2).contiguous()


def _fresh_workspace(device, numel: int, tiles: int):
    return (torch.zeros(max(numel, 1), dtype=torch.int32, device=device),
            torch.zeros(max(tiles, 1), dtype=torch.int32, device=device))


def launch(x8p, s_x, qweight, sc, channel_scale, bias, group_size, out, cfg: Config, workspace=None):
    """Run one config: ``x8p`` permuted int8 ``[M, K]``, ``sc`` from :func:`pack_sc`, ``out`` ``[M, N]`` (int32:
    raw accumulators). ``workspace(device, numel, tiles) -> (ws, cnt)``: the all-zero split-K buffers (a
    :class:`~dgq.kernels.triton_tuner.Tuner` keeps them per device; None: fresh zeros for this call)."""
    m, k = x8p.shape
    n = qweight.shape[0]
    tiles = triton.cdiv(m, cfg.BM) * triton.cdiv(n, cfg.BN)
    if cfg.SPLIT_K > 1:
        ws, cnt = (workspace or _fresh_workspace)(x8p.device, m * n, tiles)
    else:
        ws, cnt = out, out  # unused
    b = bias if bias is not None else channel_scale
    common = dict(HAS_BIAS=bias is not None, OUT_INT32=out.dtype == torch.int32, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    if qweight.data_ptr() % 16:  # e.g. a tensor inside an unaligned checkpoint blob: int32 words need alignment
        qweight = qweight.clone()
    qw = qweight.view(torch.int32)
    if cfg.kind == "gemv":
        xw = x8p.view(torch.int32)
        _dp4a_gemv_kernel[(tiles, cfg.SPLIT_K)](
            xw, qw, sc, s_x, channel_scale, b, out, ws, cnt,
            m, n, k, xw.stride(0), qw.stride(0), out.stride(0),
            GROUP=group_size, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, SPLIT_K=cfg.SPLIT_K, ASM=cfg.ASM and not _INTERPRET,
            STAGES=cfg.num_stages, **common,
        )
    else:
        _mma_kernel[(tiles, cfg.SPLIT_K)](
            x8p, qw, sc, s_x, channel_scale, b, out, ws, cnt,
            m, n, k, x8p.stride(0), qw.stride(0), out.stride(0),
            GROUP=group_size, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, SPLIT_K=cfg.SPLIT_K, GROUP_M=cfg.GROUP_M,
            SWAP=cfg.SWAP, **common,
        )
    return out


def check_shapes(k: int, group_size: int) -> str | None:
    """Why these kernels cannot run a layer of ``k`` inputs and this group size (None: they can)."""
    if k % CHUNK:
        return f"K={k} must be a multiple of {CHUNK}"
    if group_size % 64 or (group_size > 64 and group_size % 128):
        return f"group size {group_size} must be 64 or a multiple of 128"
    return None


def _gemm(x8, s_x, qweight, zeros, scales, channel_scale, bias, group_size, out, permuted, sc, config, tuner):
    m, k = x8.shape
    why = check_shapes(k, group_size)
    if why:
        raise ValueError(f"{why} for the Triton A8W4 kernels")
    if qweight.shape[1] * 2 != k:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not match K={k}")
    x8p = x8.contiguous() if permuted else permute_activations(x8)
    qweight = qweight.contiguous()
    if sc is None:
        sc = pack_sc(zeros, scales)
    s_x = s_x.float().contiguous()
    channel_scale = channel_scale.float().contiguous()
    n = qweight.shape[0]

    def run(c: Config):
        return launch(x8p, s_x, qweight, sc, channel_scale, bias, group_size, out, c,
                      tuner.workspace if tuner is not None else None)

    cfg = config
    if cfg is None:
        cands = candidates(m, n, k, group_size, num_sms(x8p.device))
        if tuner is not None:
            cfg = tuner.pick(tuner.key(x8p.device, m, n, k, group_size), cands, run, timed=x8p.device.type == "cuda")
        elif cands:
            cfg = cands[0]
        else:
            raise ValueError(f"no Triton tile config fits K={k}, group size {group_size}")
    return run(cfg)


def a8w4_gemm(x8, s_x, qweight, zeros, scales, channel_scale, bias, group_size, out_dtype=torch.float16, *,
              permuted=False, sc=None, out=None, config: Config | None = None, tuner=None):
    """``epilogue(x8 @ expand(qweight, zeros, scales)^T)`` as ``[M, N]`` ``out_dtype``.

    ``x8`` int8 ``[M, K]`` in natural order (``permuted=True``: already in the kernels' order, as
    :func:`dgq.kernels.triton_quant.quantize_per_token_triton` writes with ``permute=True``); ``s_x`` float32
    ``[M]``; the weight tensors as in the DGQ format. ``sc`` (:func:`pack_sc`) skips re-laying zeros/scales.
    ``config``: run this tile config; else ``tuner`` (:class:`~dgq.kernels.triton_tuner.Tuner`) picks one per
    shape (timed once on CUDA); with neither, the first candidate runs.
    """
    m = x8.shape[0]
    n = qweight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=x8.device)
    return _gemm(x8, s_x, qweight, zeros, scales, channel_scale, bias, group_size, out, permuted, sc, config, tuner)


def a8w4_gemm_int32(x8, qweight, zeros, scales, group_size, *, permuted=False, sc=None, out=None,
                    config: Config | None = None, tuner=None):
    """The exact int32 accumulators ``x8 @ expand(qweight, zeros, scales)^T`` (no epilogue), for tests."""
    m = x8.shape[0]
    n = qweight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=torch.int32, device=x8.device)
    dummy = torch.ones(max(m, n), dtype=torch.float32, device=x8.device)
    return _gemm(x8, dummy[:m], qweight, zeros, scales, dummy[:n], None, group_size, out, permuted, sc, config,
                 tuner)
