"""Shared pieces of the benchmark scripts: provenance for their JSON (the package's own, so `dgq compare` records
the same fields) and the process's memory as Linux reports it."""

from dgq.provenance import machine_info  # noqa: F401


def proc_status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field in MB: ``VmRSS`` (now) or ``VmHWM`` (peak); NaN where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")
