"""Shared provenance for benchmark JSON (the package's own, so `dgq compare` records the same fields)."""

from dgq.provenance import machine_info  # noqa: F401
