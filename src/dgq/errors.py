"""The one exception type dgq raises for bad input: the CLI prints its message on one line and exits 2."""

import torch


class DGQError(Exception):
    """A user-facing error: the message alone must say what is wrong and what to do."""


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise a one-line error if the tensor ``t`` holds NaN or Inf."""
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise DGQError(f"{what} contains {bad} NaN/Inf value(s); refusing to quantize it")
