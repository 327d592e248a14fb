"""What the two 4-bit formats share: codes 0..15 packed two per byte (low nibble = even column) and group sizes
along K. Pure functions of tensors."""

from __future__ import annotations

import torch

from ..errors import DGQError

CODE_MAX = 15  # 4-bit codes 0..15
INT8_MAX = 127  # symmetric int8: -127..127
NIBBLE_ORDER = "low-first"


def legal_group_sizes(k: int) -> list[int]:
    """Group sizes a layer with ``k`` inputs can take (divisors of k; k must be even for packing)."""
    return [d for d in range(1, k + 1) if k % d == 0]


def resolve_group_size(k: int, group_size: int, name: str = "layer") -> int:
    """Return the effective group size (``-1`` or ``0`` = one group per row) or raise naming the layer."""
    if k % 2:
        raise DGQError(f"{name}: input size {k} is odd; 4-bit codes pack two per byte so K must be even")
    g = k if group_size in (-1, 0) else group_size
    if g < 1 or k % g:
        legal = ", ".join(str(d) for d in legal_group_sizes(k) if d >= 8) or str(k)
        raise DGQError(
            f"{name}: group size {group_size} does not divide its input size {k}; legal group sizes: {legal} "
            f"(or -1 for per-channel)"
        )
    return g


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """Pack ``[N, K]`` codes in 0..15 into ``[N, K // 2]`` uint8, low nibble = even column."""
    if codes.shape[-1] % 2:
        raise DGQError(f"cannot pack {codes.shape[-1]} codes per row: the count must be even")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_uint4`: ``[N, K // 2]`` uint8 -> ``[N, K]`` uint8 codes."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


class Packed4:
    """What the two 4-bit containers share: codes two per byte in ``qweight [N, K/2]`` (uint8), groups of
    ``group_size`` along K."""

    qweight: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], 2 * self.qweight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def check_layout(self, where: str) -> tuple[int, int, int]:
        """``(N, K, group size)`` after checking that the codes are a 2-D uint8 tensor and the groups divide K."""
        if self.qweight.dim() != 2 or self.qweight.dtype != torch.uint8:
            raise DGQError(f"{where}: qweight is {self.qweight.dtype} of {self.qweight.dim()} dims, expected 2-D uint8")
        n, k = self.shape
        if self.group_size < 1 or k % self.group_size:
            raise DGQError(f"{where}: group size {self.group_size} does not divide K={k}")
        return n, k, self.group_size


def check_tensor(t: torch.Tensor, name: str, shape: tuple, dtype: torch.dtype, where: str) -> None:
    """Raise a one-line error naming ``where`` unless ``t`` has this shape and dtype."""
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise DGQError(f"{where}: {name} has shape {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")


def check_positive_finite(t: torch.Tensor, name: str, where: str) -> None:
    """Float scales must be finite and > 0: NaN, Inf, zero or negative scales would give garbage silently."""
    tf = t.float()
    bad = ~(torch.isfinite(tf) & (tf > 0))
    if bool(bad.any()):
        raise DGQError(f"{where}: {name} holds {int(bad.sum())} NaN, Inf, zero or negative value(s); corrupt weights")
