"""Tile-config choice for the Triton A8W4 kernels: a :class:`Tuner` owns the configs it picked, its log, the timings
of every candidate and the split-K workspace. Importable without triton (the kernels are handed in as a ``run``
callable; ``triton.testing.do_bench`` and the ``Config`` class are imported when needed).

Per (device, M bucket, N, K, group size) the first call on CUDA launches every candidate once, compares its output
bitwise with the first candidate that ran (a disagreeing, failing or non-compiling candidate is dropped and logged),
times the rest and keeps the fastest. ``DGQ_TRITON_TUNE=0`` takes the first candidate untimed;
``DGQ_TRITON_TUNED=<path>`` preloads configs that :meth:`Tuner.save` wrote (another process on the same card).
"""

from __future__ import annotations

import json
import os

import torch


def bucket(m: int) -> int:
    """The M bucket of a tuning key: the next power of two, at most 8192."""
    b = 1
    while b < m and b < 8192:
        b *= 2
    return b


class Tuner:
    """Tuned configs, tuning log and timings of one process (``tuned``, ``log``, ``times``) and the split-K
    workspace per device (kept all-zero between launches: the kernels re-zero what they used)."""

    def __init__(self, tune: bool | None = None):
        self.tune = os.environ.get("DGQ_TRITON_TUNE", "1") != "0" if tune is None else tune
        self.tuned: dict = {}  # key -> Config
        self.log: list = []  # (key, [(config, ms)]) or (key, "config: why it was dropped")
        self.times: dict = {}  # key -> [(Config, ms)] of the last tuning (inf: failed or disagreed)
        self._ws: dict = {}  # device -> (int32 workspace, int32 arrival counters)
        self._env_loaded = False

    @staticmethod
    def key(device, m: int, n: int, k: int, group_size: int) -> tuple:
        return (str(device), bucket(m), n, k, group_size)

    def get(self, device, m: int, n: int, k: int, group_size: int):
        """The config picked earlier for this shape, or None."""
        return self.tuned.get(self.key(device, m, n, k, group_size))

    def pick(self, key: tuple, cands: list, run, timed: bool):
        """The config for ``key``: cached, else the first candidate (``timed=False``, tuning off or a single
        candidate), else the fastest candidate whose output ``run(config)`` equals the first working one's."""
        cfg = self.tuned.get(key)
        if cfg is not None:
            return cfg
        if not cands:
            raise ValueError(f"no Triton tile config fits {key}")
        cfg = cands[0] if not timed or not self.tune or len(cands) == 1 else self._time(key, cands, run)
        self.tuned[key] = cfg
        return cfg

    def _time(self, key: tuple, cands: list, run):
        from triton.testing import do_bench

        timed, ref, ref_cfg = [], None, None
        for c in cands:
            try:
                got = run(c).clone()
                if ref is None:
                    ref, ref_cfg = got, c
                elif not torch.equal(got, ref):  # a config that disagrees with the first working one is dropped
                    timed.append((c, float("inf")))
                    self.log.append((key, f"{c}: DISAGREES with {ref_cfg}"))
                    continue
                ms = do_bench(lambda c=c: run(c), warmup=3, rep=15, return_mode="median")
            except Exception as e:  # noqa: BLE001 - a config that fails to compile or launch is dropped
                ms = float("inf")
                self.log.append((key, f"{c}: {type(e).__name__}: {str(e)[-2000:]}"))  # the cause is at the end
            timed.append((c, ms))
        timed.sort(key=lambda t: t[1])
        self.times[key] = timed
        if timed[0][1] == float("inf"):
            raise RuntimeError(f"no Triton A8W4 config ran for {key}; see the tuner's log")
        self.log.append((key, [(str(c), ms) for c, ms in timed]))
        return timed[0][0]

    def save(self, path: str) -> None:
        """Write the tuned configs (to reuse them in another process on the same card)."""
        with open(path, "w") as f:
            json.dump([[list(kk), c.__dict__] for kk, c in self.tuned.items()], f)

    def load(self, path: str) -> int:
        """Add the configs of a :meth:`save` file; returns how many."""
        from .triton_gemm import Config

        with open(path) as f:
            items = json.load(f)
        for kk, c in items:
            self.tuned[tuple(kk)] = Config(**c)
        return len(items)

    def load_env(self) -> None:
        """Load ``$DGQ_TRITON_TUNED`` once (a missing or stale file is logged, not raised)."""
        if self._env_loaded:
            return
        self._env_loaded = True
        path = os.environ.get("DGQ_TRITON_TUNED")
        if path:
            try:
                self.load(path)
            except (OSError, ValueError, TypeError) as e:
                self.log.append(("DGQ_TRITON_TUNED", f"{path} not loaded: {type(e).__name__}: {e}"))

    def workspace(self, device, numel: int, tiles: int):
        """The all-zero int32 split-K workspace (>= ``numel``) and arrival counters (>= ``tiles``) of ``device``."""
        ws, cnt = self._ws.get(device, (None, None))
        if ws is None or ws.numel() < numel:
            ws = torch.zeros(max(numel, 1 << 16), dtype=torch.int32, device=device)
        if cnt is None or cnt.numel() < tiles:
            cnt = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        self._ws[device] = (ws, cnt)
        return ws, cnt
