"""Exact orthogonal rotations folded into a float model, as pure functions of tensors.

**Per-head value rotation.**
An orthogonal ``Q`` (``d × d``, ``d`` = head dim) applied to every value head is exact when folded offline: v_proj's
output rows of each KV head become ``Q·W_v`` (and ``Q·b_v``), so every cached value is ``Q·v``; attention mixes
values linearly, so each head's output is ``Q·o``; o_proj's input columns of each head become ``W_o·Qᵀ``, and its
output is unchanged. Grouped-query attention needs nothing more: every query head reads a KV head rotated by the
same ``Q``. The point is o_proj's int8 activations: a Hadamard ``Q`` spreads a head's outlier channels over all of its
``d`` channels, so per-token int8 loses less (QuaRot's offline value rotation, without its online transforms).

**Residual-stream rotation.** With every RMSNorm's weight folded into the linears that read its output (their input
columns scaled by it; the norm's weight set to one), an orthogonal ``Q`` (hidden × hidden) applied to the residual
stream, ``h → h·Q``, commutes with every norm (``rms(h·Q) = rms(h)``): the embeddings become ``E·Q``, every reader of
a norm (q/k/v, gate/up, lm_head) ``W·Q``, every writer to the stream (o_proj, down_proj) ``Qᵀ·W`` (and ``Qᵀ·b``).
The model computes the same function; the int8 inputs of q/k/v and gate/up lose their outlier channels, and every
4-bit group of those weights sees a mix of all channels (QuaRot's R1, offline only).

``Q`` (:func:`orthogonal_matrix`) is the normalized Sylvester Hadamard matrix times a seeded random sign per column
where the size is a power of two, else a seeded random orthogonal matrix.
"""

from __future__ import annotations

import torch


def hadamard(d: int) -> torch.Tensor:
    """The normalized ``d × d`` Sylvester Hadamard matrix (float64; ``d`` a power of two): symmetric, orthogonal,
    every entry ``±1/√d``."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d ** 0.5


def orthogonal_matrix(d: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal ``d × d`` float64 matrix (see the module docstring); the same ``(d, seed)`` gives the same one."""
    if d < 1:
        raise ValueError(f"head dim must be positive, got {d}")
    gen = torch.Generator().manual_seed(seed)
    if d & (d - 1) == 0:
        signs = torch.randint(0, 2, (d,), generator=gen).double() * 2 - 1
        return hadamard(d) * signs[None, :]
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _check(n: int, d: int, what: str) -> None:
    if n % d:
        raise ValueError(f"{what} of size {n} is not a whole number of heads of dim {d}")


def rotate_rows(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Q`` applied to each head's rows: weight ``[heads·d, K]`` or bias ``[heads·d]`` (v_proj's output side)."""
    d = q.shape[0]
    _check(t.shape[0], d, "rows")
    x = t.double().reshape(-1, d, *t.shape[1:])
    out = torch.einsum("ij,hj...->hi...", q.to(x.device), x)
    return out.reshape(t.shape).to(t.dtype)


def rotate_columns(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``·Qᵀ`` on each head's columns of ``[N, heads·d]``: o_proj's weight, or its input rows (tokens × channels)."""
    d = q.shape[0]
    _check(t.shape[-1], d, "columns")
    x = t.double().reshape(*t.shape[:-1], -1, d)
    return (x @ q.to(x.device).T).reshape(t.shape).to(t.dtype)


def rotate_in(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``W·Q``: a linear (or embedding) whose input (or output) is the rotated residual stream."""
    return (w.double() @ q.to(w.device)).to(w.dtype)


def rotate_out(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Qᵀ·W`` (weight ``[d, K]``) or ``Qᵀ·b`` (bias ``[d]``): a linear that writes to the residual stream."""
    return (q.to(t.device).T @ t.double()).to(t.dtype)


def rotate_gram(h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``R·H·Rᵀ`` with ``R`` = blockdiag(Q): a ``Σ xᵀx`` of inputs whose heads are rotated (``x → x·Rᵀ``)."""
    return rotate_columns(rotate_columns(h, q).T, q).T.contiguous()
