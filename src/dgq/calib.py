"""Calibration orchestration: run calibration windows through the model and collect activation statistics."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import DGQError


@torch.no_grad()
def static_act_scales(model: nn.Module, calib: torch.Tensor, names: list[str], progress: bool = True) -> dict:
    """Static per-tensor int8 scale for each named linear's input (dgq-method.md §5, as the release does it):
    per window, the per-channel absmax; then the minimum over windows; then the maximum over channels; / 127."""
    per_window: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = []

    def make_hook(name):
        def hook(mod, args):
            x = args[0].detach()
            if not torch.isfinite(x).all():
                raise DGQError(f"NaN/Inf in the input activations of {name} during calibration")
            per_window[name].append(x.reshape(-1, x.shape[-1]).abs().amax(0).float().cpu())

        return hook

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(make_hook(n)))
    try:
        for row in tqdm(calib, desc="calibrate", disable=not progress, leave=False):
            model(row[None].to(model.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, stats in per_window.items():
        s = torch.stack(stats).amin(0).amax().item() / 127.0
        out[n] = s if s > 0 else 1.0
    return out
