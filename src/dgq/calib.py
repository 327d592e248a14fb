"""Calibration orchestration: block-by-block DGQ calibration with hooks, activation capture and bounded memory.

The first block's inputs are captured once; block i is calibrated on the outputs of the already-quantized blocks
< i. Activations live on the CPU, one block's worth at a time (inputs, FP outputs, sub-sampled linear inputs), so
peak memory is the model plus one block's activations, whatever the depth.

Per block: (1) a float pass with hooks collects, for every quantized linear's input, the per-window per-channel
absmax and a fixed random sub-sample of tokens; (2) percentile smoothing factors are computed from those and
folded exactly into the weights (the captured statistics are rescaled the same way, no second pass needed);
(3) each linear's scales are searched on its sub-sampled inputs and it is swapped for a DGQLinear; (4) a quantized
pass produces the next block's inputs. Each linear's relative output error is logged.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Arch, Smooth, get_blocks, set_submodule
from .errors import DGQError, check_finite
from .formats.act import quantize_per_tensor, quantize_per_token
from .kvcache import cache_kwarg
from .quant import rotate as rot
from .quant import smooth as sm
from .quant.rtn import rtn_quantize
from .quant.search import hessian
from .rotation import head_dim, residual_matrix, rotate_residual_block, rotation_alternative

log = logging.getLogger("dgq")


class _Stop(Exception):
    pass


class ActivationStore:
    """Where the calibration activations live (the block inputs, float outputs and quantized outputs: three tensors
    of windows x seqlen x hidden): CPU memory, or — when the three would exceed ``budget_bytes`` — memory-mapped
    files in a temporary folder under ``folder``, which the OS pages in and out (the files are unlinked as soon as
    they are mapped, so nothing is left on disk, even after a crash). Values are the same either way."""

    def __init__(self, budget_bytes: int | None = None, folder=None):
        if budget_bytes is not None and budget_bytes <= 0:
            raise DGQError(f"the activation budget must be positive, got {budget_bytes} bytes")
        self.budget, self.folder, self.spill, self._n = budget_bytes, folder, False, 0

    def plan(self, windows: int, seqlen: int, hidden: int, dtype=torch.float32) -> None:
        """Decide from the activations' size (three tensors) whether they go to disk; checks the disk has room."""
        need = 3 * windows * seqlen * hidden * torch.empty((), dtype=dtype).element_size()
        self.spill = self.budget is not None and need > self.budget
        if self.spill:
            base = Path(self.folder or tempfile.gettempdir())
            if not base.is_dir():
                raise DGQError(f"activation folder {base} does not exist")
            free = shutil.disk_usage(base).free
            if free < need:
                raise DGQError(f"the calibration activations need {need / 1e9:.2f} GB on disk beyond the budget of "
                               f"{self.budget / 1e9:.2f} GB, and {base} has {free / 1e9:.2f} GB free")
            log.info("dgq: calibration activations (%.2f GB) exceed the budget (%.2f GB): memory-mapped under %s",
                     need / 1e9, self.budget / 1e9, base)

    def empty(self, shape, dtype) -> torch.Tensor:
        if not self.spill:
            return torch.empty(shape, dtype=dtype)
        numel = math.prod(shape)
        fd, path = tempfile.mkstemp(prefix=f"dgq-act-{os.getpid()}-{self._n}-", dir=self.folder)
        self._n += 1
        try:
            os.close(fd)
            t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        finally:
            os.unlink(path)  # the mapping keeps the data; the file's space is freed when the tensor is
        return t.view(shape)


def _gather(chunks, n: int, store: ActivationStore | None) -> torch.Tensor:
    """Per-window ``[1, L, d]`` tensors (an iterator) written into one ``[n, L, d]`` tensor from ``store``."""
    out = None
    for i, c in enumerate(chunks):
        if out is None:
            out = (store or ActivationStore()).empty((n, *c.shape[1:]), c.dtype)
        out[i] = c[0]
    return out


@dataclass
class LinearStats:
    """What the float pass records about one linear's input."""

    window_absmax: list = field(default_factory=list)  # per window: [K] absmax
    samples: list = field(default_factory=list)  # per window: [t, K] sub-sampled tokens
    _h: torch.Tensor | None = None
    h_sum: torch.Tensor | None = None  # Σ xᵀx over every calibration token (GPTQ), when collected
    h_tok: torch.Tensor | None = None  # Σ x̂ᵀx̂ with x̂ = x/‖x‖: every token weighted equally
    h_count: int = 0
    released: bool = False

    def _check_held(self) -> None:
        if self.released:  # recomputing from the samples would silently change the math
            raise RuntimeError("dgq internal error: a Hessian was asked for after release_hessians()")

    def hessian(self) -> torch.Tensor:
        """``XᵀX / T``: over every calibration token when it was accumulated (``full_hessian``), else over the
        sampled tokens; computed once (linears that share an input share their stats)."""
        self._check_held()
        if self._h is None:
            if self.h_sum is not None:
                self._h = (self.h_sum / max(1, self.h_count)).float()
            else:
                self._h = hessian(self.x())
        return self._h

    def add_full(self, x: torch.Tensor, token: bool = False) -> None:
        """Accumulate ``xᵀx`` (and, with ``token``, the token-weighted ``x̂ᵀx̂``) over these tokens."""
        # float64 where the math needs it: Σ xᵀx over tens of thousands of tokens with massive-activation channels
        # (|x| ~ 1e3) loses the small entries in float32, and GPTQ inverts this matrix (gptq.inverse_hessian_factor,
        # also float64); everything else in calibration is float32
        xd = x.double()
        self.h_sum = xd.T @ xd if self.h_sum is None else self.h_sum.add_(xd.T @ xd)
        if token:
            xn = xd / xd.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.h_tok = xn.T @ xn if self.h_tok is None else self.h_tok.add_(xn.T @ xn)
        self.h_count += x.shape[0]

    def token_hessian(self) -> torch.Tensor:
        """``Σ x̂ᵀx̂ / T`` with every token scaled to unit norm, so the objective is the mean *relative* output error
        per token: a few massive-activation tokens (attention sinks) no longer dominate it. Over every calibration
        token when accumulated (``collect_stats(token_hessian=True)``), else over the sampled tokens (exact: the
        samples are rescaled by smoothing folds, so their norms are current)."""
        self._check_held()
        if self.h_tok is not None:
            return (self.h_tok / max(1, self.h_count)).float()
        if self.h_sum is not None:
            raise DGQError("token-weighted Hessian was not collected (collect_stats(token_hessian=True))")
        x = self.x()
        return hessian(x / x.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def release_hessians(self) -> None:
        """Drop the K×K matrices once every linear reading this input is made: down_proj's (11008² float32,
        485 MB in a 7B model) is then the only one alive while it is searched."""
        self._h = self.h_sum = self.h_tok = None
        self.released = True

    def absmax(self) -> torch.Tensor:
        return torch.stack(self.window_absmax).amax(0)

    def x(self) -> torch.Tensor:
        return torch.cat(self.samples)

    def static_scale(self) -> float:
        """The release's static per-tensor scale: max over channels of min over windows of per-channel absmax."""
        s = torch.stack(self.window_absmax).amin(0).amax().item() / 127.0
        return s if s > 0 else 1.0

    def rescale(self, f: torch.Tensor) -> None:
        """Inputs divided per channel by ``f`` (what smoothing does to this linear's input)."""
        self.window_absmax = [a / f for a in self.window_absmax]
        self.samples = [s / f for s in self.samples]
        fd = f.double()
        if self.h_sum is not None:
            self.h_sum = self.h_sum / fd[:, None] / fd[None, :]
        if self.h_tok is not None:  # approximate: the per-token norms change with the fold too
            self.h_tok = self.h_tok / fd[:, None] / fd[None, :]
        self._h = None

    def rotated(self, q: torch.Tensor) -> LinearStats:
        """The statistics of this input with every head's channels rotated, ``x → x·Rᵀ`` (``R`` = blockdiag(q)):
        exact for the samples and both Hessians (a rotation keeps each token's norm); not for the per-channel
        absmax, which static activation scales would need (``rotate`` refuses ``act="static"``)."""
        self._check_held()
        return LinearStats(window_absmax=[], samples=[rot.rotate_columns(s, q) for s in self.samples],
                           h_sum=None if self.h_sum is None else rot.rotate_gram(self.h_sum, q),
                           h_tok=None if self.h_tok is None else rot.rotate_gram(self.h_tok, q),
                           h_count=self.h_count)


@contextmanager
def _pass_through(blocks: list[nn.Module], like: nn.Module):
    """Blocks whose weights are not loaded (streaming: they live on the meta device) return their input unchanged,
    in the form ``like`` (a loaded block) returns its output, so that one forward of the model reaches every block's
    pre-hook (their keyword arguments) without running them."""
    kind: dict = {}

    def record(mod, args, kwargs, out):
        kind.setdefault("tuple", isinstance(out, tuple))

    def stub(hidden_states, *args, **kwargs):
        return (hidden_states,) if kind.get("tuple") else hidden_states

    handle = like.register_forward_hook(record, with_kwargs=True)
    for b in blocks:
        b.forward = stub  # an instance attribute shadows the class's forward; deleted below
    try:
        yield
    finally:
        handle.remove()
        for b in blocks:
            del b.forward


@torch.no_grad()
def capture_block_inputs(model: nn.Module, arch: Arch, calib: torch.Tensor, device=None, loaded: int | None = None,
                         store: ActivationStore | None = None):
    """Inputs of block 0 for every window ([n, L, d] on the CPU) and each block's keyword arguments.

    Keyword arguments (masks, rotary tables) depend only on the window length, so they are taken from the first
    window, per block (Gemma 2/3 give sliding and full attention layers different masks). ``loaded``: only the first
    ``loaded`` blocks have weights (streaming); the others pass their input through for that one forward.
    """
    blocks = get_blocks(model, arch)
    device = device if device is not None else next(model.parameters()).device
    kwargs_per_block: list = [None] * len(blocks)
    hidden: list[torch.Tensor] = []

    def grab_kwargs(i):
        def hook(mod, args, kwargs):
            if kwargs_per_block[i] is None:
                kwargs_per_block[i] = {k: v for k, v in kwargs.items() if k not in ("hidden_states",)}
        return hook

    def grab_hidden(mod, args, kwargs):
        hidden.append((args[0] if args else kwargs["hidden_states"]).detach().cpu())
        if kwargs_per_block[-1] is not None:
            raise _Stop

    def stop(mod, args):
        raise _Stop  # nothing after the last block's keyword arguments is needed (final norm, lm_head)

    hooks = [b.register_forward_pre_hook(grab_kwargs(i), with_kwargs=True) for i, b in enumerate(blocks)]
    hooks.append(blocks[0].register_forward_pre_hook(grab_hidden, with_kwargs=True))
    hooks.append(blocks[-1].register_forward_pre_hook(stop))
    stubs = _pass_through(list(blocks)[loaded:], blocks[0]) if loaded is not None else nullcontext()
    try:
        with stubs:
            for row in calib:
                try:
                    model(row[None].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    for kw in kwargs_per_block:
        kw.pop("use_cache", None)
        kw["use_cache"] = False
        for key in ("past_key_values", "past_key_value", "cache"):
            kw.pop(key, None)
    if store is not None and hidden:
        store.plan(len(hidden), hidden[0].shape[1], hidden[0].shape[2], hidden[0].dtype)
    return _gather(hidden, len(hidden), store), kwargs_per_block


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device, kv_observer=None,
              store: ActivationStore | None = None) -> torch.Tensor:
    """The block's outputs for every window (one window at a time), on the CPU (in ``store``). ``kv_observer``
    (:class:`dgq.kvcache.KVObserver`): records the absmax of the keys and values the block's attention caches."""
    if kv_observer is not None:
        kwargs = {**kwargs, cache_kwarg(block): kv_observer}

    def outs():
        for h in hidden:
            o = block(h[None].to(device), **kwargs)
            yield (o[0] if isinstance(o, tuple) else o).detach().cpu()

    return _gather(outs(), len(hidden), store)


@contextmanager
def watch_inputs(root: nn.Module, names: list[str], on_input):
    """Forward pre-hooks on ``root``'s submodules ``names`` calling ``on_input(name, x)`` with each call's first
    input; removed on exit, also on error."""
    def hook_for(name):
        def hook(mod, args):
            on_input(name, args[0])
        return hook

    hooks = [root.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def input_rows(x: torch.Tensor, where: str) -> torch.Tensor:
    """A linear's input as float32 ``[tokens, K]`` on its device (the statistics stay where the block runs; the
    block inputs/outputs are kept on the CPU); NaN/Inf is a calibration error naming ``where``."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    if not torch.isfinite(x).all():
        raise DGQError(f"NaN/Inf in the input activations of {where} during calibration")
    return x


@torch.no_grad()
def collect_stats(block: nn.Module, names: list[str], hidden: torch.Tensor, kwargs: dict, tokens_per_window: int,
                  seed: int, block_index: int, device, full_hessian: bool = False, token_hessian: bool = False,
                  store: ActivationStore | None = None) -> tuple[dict[str, LinearStats], torch.Tensor]:
    """Float pass over the block: per-linear input statistics (with ``full_hessian``, also ``Σ xᵀx`` over every
    token, in float64), and the block's float outputs."""
    stats = {n: LinearStats() for n in names}
    gen = torch.Generator().manual_seed(seed * 100003 + block_index)
    seqlen = hidden.shape[1]
    idx_holder = {}
    # linears fed the very same tensor (q/k/v, gate/up) share one LinearStats; holding the tensor for the window
    # keeps its id from being reused by a later, different input
    seen: dict[int, tuple[str, torch.Tensor]] = {}

    def on_input(name, x):
        first = seen.setdefault(id(x), (name, x))[0]
        if first != name:
            stats[name] = stats[first]
            return
        x = input_rows(x, f"block {block_index} layer {name}")
        stats[name].window_absmax.append(x.abs().amax(0))
        stats[name].samples.append(x[idx_holder["idx"]].clone())
        if full_hessian:
            stats[name].add_full(x, token=token_hessian)

    def outs():
        for h in hidden:
            idx_holder["idx"] = torch.randperm(seqlen, generator=gen)[:tokens_per_window].sort().values
            seen.clear()
            o = block(h[None].to(device), **kwargs)
            yield (o[0] if isinstance(o, tuple) else o).detach().cpu()

    with watch_inputs(block, names, on_input):
        out = _gather(outs(), len(hidden), store)
    if not torch.isfinite(out).all():
        raise DGQError(f"NaN/Inf in the outputs of block {block_index} during calibration")
    return stats, out


def _rows(t: torch.Tensor, spec: Smooth) -> slice:
    n = t.shape[0]
    return slice(n // 2, n) if spec.src_rows == "second_half" else slice(0, n)


@torch.no_grad()
def fold_smoothing(block: nn.Module, spec: Smooth, f: torch.Tensor, norm_offset: float) -> None:
    """Fold ``f`` exactly: source divided by f, consumers' input columns multiplied by f."""
    src = block.get_submodule(spec.src)
    if spec.kind == "norm":
        w = getattr(src, "weight", None)
        if not isinstance(w, torch.Tensor) or w.shape != f.shape:
            raise DGQError(f"cannot fold smoothing into {spec.src} ({type(src).__name__}): it has no per-channel "
                           f"weight; use --no-smooth")
        w.copy_(sm.fold_norm_weight(w, f.to(w.device), norm_offset))
        b = getattr(src, "bias", None)
        if isinstance(b, torch.Tensor):
            b.copy_(sm.scale_output_rows(b, f.to(b.device)))
    else:
        rows = _rows(src.weight, spec)
        src.weight[rows] = sm.scale_output_rows(src.weight[rows], f.to(src.weight.device))
        if src.bias is not None:
            src.bias[rows] = sm.scale_output_rows(src.bias[rows], f.to(src.bias.device))
    for d in spec.dsts:
        lin = block.get_submodule(d)
        lin.weight.copy_(sm.scale_input_columns(lin.weight, f.to(lin.weight.device)))


def _proxy_error(w: torch.Tensor, x: torch.Tensor, static_scale: float | None, group_size: int) -> float:
    """Squared output error of data-free DGQ weights with int8 activations (the selective-smoothing criterion)."""
    w_hat = rtn_quantize(w, group_size).dequantize()
    if static_scale is None:
        x8, s_x = quantize_per_token(x)
    else:
        x8, s_x = quantize_per_tensor(x, torch.tensor(static_scale, device=x.device))
    return ((x8.float() * s_x[:, None]) @ w_hat.T - x @ w.T).square().sum().item()


def fold_gain(dsts: dict, f: torch.Tensor, config) -> tuple[float, float]:
    """Selective smoothing: the consumers' summed quantized output error without and with the fold ``f``
    (``dsts``: name -> (float weight, stats, group size); weights quantized data-free, activations as the layer will
    run them). Keep the fold only if it helps."""
    off = on = 0.0
    static = config.act_mode == "static"
    for w, st, g in dsts.values():
        x = st.x()
        off += _proxy_error(w, x, st.static_scale() if static else None, g)
        st_on = LinearStats([a / f for a in st.window_absmax], [x / f])
        on += _proxy_error(w * f[None, :], x / f, st_on.static_scale() if static else None, g)
    return off, on


def relative_errors(w: torch.Tensor, layer, x: torch.Tensor) -> dict:
    """Relative output errors on sampled inputs: weight-only (the W4 part) and as executed (A8W4)."""
    w = w.float()
    y = x @ w.T
    ref_norm = y.norm().clamp_min(1e-12)
    w_hat = layer.dequantized_weight()
    e_w4 = ((x @ w_hat.T - y).norm() / ref_norm).item()
    out = {"w4": round(e_w4, 5)}
    if layer.act_mode != "none":
        x8, s_x = (quantize_per_tensor(x, layer.act_scale) if layer.act_mode == "static" else quantize_per_token(x))
        y_q = (x8.float() * s_x[:, None]) @ w_hat.T
        out["a8w4"] = round(((y_q - y).norm() / ref_norm).item(), 5)
        out["a8"] = round((((x8.float() * s_x[:, None]) @ w.T - y).norm() / ref_norm).item(), 5)
    return out


def token_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over tokens of ``‖out_t − ref_t‖² / ‖ref_t‖²`` (each token counts the same, sinks included)."""
    d = (out - ref).float().square().sum(-1)
    return (d / ref.float().square().sum(-1).clamp_min(1e-12)).mean().item()


def _layer_error(layers: list, x: torch.Tensor, y: torch.Tensor) -> float:
    """The best candidate's relative output error ``‖layer(x) − y‖² / ‖y‖²`` on the sampled tokens ``x``."""
    ref = y.float().square().sum().clamp_min(1e-12)
    return min(((layer(x).float() - y.float()).square().sum() / ref).item() for layer in layers)


@torch.no_grad()
def measured_fold_gain(block: nn.Module, spec: Smooth, f: torch.Tensor, prefix: str, targets: dict, stats: dict,
                       config, method) -> tuple[float, float, dict]:
    """Measured smoothing decision: each consumer is quantized by the method itself (``make_layers``) without and
    with the fold ``f`` and run as it will execute (activations quantized as configured) on its sampled calibration
    tokens; returns the consumers' summed relative output errors ``(off, on)`` and the layers made for the better
    option (name -> candidates), which ``quantize_block`` then uses instead of quantizing again."""
    off = on = 0.0
    made_off, made_on = {}, {}
    for d in spec.dsts:
        lin, st = block.get_submodule(d), stats[d]
        x = st.x().to(lin.weight.device)
        y = nn.functional.linear(x.to(lin.weight.dtype), lin.weight, lin.bias).float()
        made_off[d] = make_layers(method, lin, prefix + d, targets[prefix + d].group_size, st, config)
        off += _layer_error(made_off[d], x, y)
        lin_on = copy.deepcopy(lin)
        lin_on.weight.copy_(sm.scale_input_columns(lin.weight, f.to(lin.weight.device)))  # as fold_smoothing does
        st_on = copy.copy(st)
        st_on.rescale(f)
        made_on[d] = make_layers(method, lin_on, prefix + d, targets[prefix + d].group_size, st_on, config)
        on += _layer_error(made_on[d], st_on.x().to(lin.weight.device), y)
        del lin_on
    return off, on, (made_on if on < off else made_off)


def smooth_block(block: nn.Module, arch: Arch, prefix: str, targets: dict, stats: dict, config, method,
                 premade: dict | None = None) -> dict:
    """Step 2 of a block: compute the method's smoothing factors at each of the arch table's mappings whose
    consumers are all quantized, fold them exactly, and rescale the captured statistics the same way. Returns the
    log entries (``smoothed``, and ``selective`` when the fold is kept only where it lowers the consumers' error).

    ``smooth="selective"`` judges a fold by a data-free proxy (RTN weights); ``smooth="measured"`` quantizes the
    consumers with the method itself both ways (:func:`measured_fold_gain`) and leaves the layers of the kept option
    in ``premade`` (name -> candidates) for ``quantize_block``."""
    entry: dict = {"smoothed": {}}
    premade = {} if premade is None else premade
    for spec in arch.smooth:
        if not all(d in stats for d in spec.dsts):
            continue
        if spec.kind == "linear" and prefix + spec.src not in targets:
            continue
        f, info = method.smoothing(spec, block, stats, config, targets[prefix + spec.dsts[0]].group_size)
        if f is None or bool((f == 1).all()):
            continue
        if config.smooth in ("selective", "measured"):
            if config.smooth == "measured":
                off, on, made = measured_fold_gain(block, spec, f, prefix, targets, stats, config, method)
                premade.update(made)
            else:
                dsts = {d: (block.get_submodule(d).weight.detach().float(), stats[d],
                            targets[prefix + d].group_size) for d in spec.dsts}
                off, on = fold_gain(dsts, f, config)
            entry.setdefault("selective", {})[spec.src] = {"error_off": off, "error_on": on, "kept": on < off}
            if not on < off:
                continue
        fold_smoothing(block, spec, f, arch.norm_offset)
        premade.pop(spec.src, None)  # a linear source's rows change: its layers are made again
        for st in {id(stats[d]): stats[d] for d in spec.dsts}.values():
            st.rescale(f)
        entry["smoothed"][spec.src] = {"channels": int((f != 1).sum()), "max_factor": round(f.max().item(), 3),
                                       "min_factor": round(f.min().item(), 4), **info}
    return entry


def make_layers(method, lin: nn.Linear, name: str, group_size: int, stats, config) -> list:
    """The method's candidate modules for one linear; a refusal from the quantizers names the layer."""
    try:
        return method.make_layers(lin, name, group_size, stats, config)
    except DGQError as e:
        raise DGQError(f"{name}: {e}") from None


@dataclass
class Made:
    """One linear's float weight (for the error log), its device, and its candidate quantized modules."""

    weight: torch.Tensor
    device: torch.device
    candidates: list


def _install(block: nn.Module, made: dict[str, Made], j: int) -> dict:
    """Swap in candidate ``j`` of every made layer (a layer with one candidate is its own every candidate)."""
    chosen = {n: m.candidates[min(j, len(m.candidates) - 1)].to(m.device) for n, m in made.items()}
    for n, layer in chosen.items():
        set_submodule(block, n, layer)
    return chosen


def _make(method, lin: nn.Module, name: str, group_size: int, st, config, layers: list | None = None) -> Made:
    """``lin``'s candidates (``layers`` when already made, e.g. by measured smoothing), set to expand per call."""
    layers = layers or make_layers(method, lin, name, group_size, st, config)
    # expand per call while calibrating: cached expansions of the candidates (1-4 bytes per weight on the CPU)
    # would outweigh the float block itself; the chosen layers cache again afterwards
    for layer in layers:
        layer.cache_weights = False
    return Made(lin.weight.detach(), lin.weight.device, layers)


@torch.no_grad()
def quantize_block(block: nn.Module, index: int, prefix: str, targets: dict, stats: dict, hidden: torch.Tensor,
                   fp_out: torch.Tensor, kwargs: dict, device, config, method,
                   premade: dict | None = None, store: ActivationStore | None = None,
                   rotation: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Steps 3-4 of a block: the method makes each linear's candidates (or takes them from ``premade``, made for
    these very weights and statistics while smoothing); every candidate index is run on the calibration windows
    and the block keeps the one with the lowest mean per-token relative output error. Returns the quantized
    block's outputs (the next block's inputs) and the log entries.

    ``rotation`` (:func:`rotation_alternative`): with ``config.rotate="measured"`` the rotated value/output
    projections are made too and every candidate index is also run with them in place; the block keeps the rotation
    only if its best error is the lower one. With ``"on"`` only the rotated ones are made."""
    made: dict[str, Made] = {}
    made_rot: dict[str, Made] = {}
    premade = premade or {}
    rotation = rotation or {}
    only_rotated = config.rotate == "on"
    for n in stats:
        lin = block.get_submodule(n)
        check_finite(lin.weight.detach(), f"weight of {prefix + n} (after smoothing)")
        g = targets[prefix + n].group_size
        if n in rotation:
            made_rot[n] = _make(method, rotation[n][0], prefix + n, g, rotation[n][1], config)
        if not (only_rotated and n in rotation):
            made[n] = _make(method, lin, prefix + n, g, stats[n], config, premade.get(n))
        if not any(stats[m] is stats[n] for m in stats if m not in made and m not in made_rot):
            stats[n].release_hessians()  # no linear left needs them (the error log below uses the samples)
    for _, st in rotation.values():
        if not st.released:
            st.release_hessians()
    with_rot = {n: made_rot.get(n) or made[n] for n in stats}
    variants = [made] if not made_rot else ([with_rot] if only_rotated else [made, with_rot])
    errors: list[list[float]] = []
    best = None
    for r, var in enumerate(variants):
        errors.append([])
        for j in range(max(len(m.candidates) for m in var.values())):
            chosen = _install(block, var, j)
            q_out = run_block(block, hidden, kwargs, device, store=store)
            if not torch.isfinite(q_out).all():
                raise DGQError(f"NaN/Inf in the outputs of quantized block {index}")
            err = token_relative_error(q_out, fp_out)
            errors[-1].append(round(err, 6))
            if best is None or err < best[0]:
                best = (err, r, j, q_out, chosen)
    _, r_best, j_best, q_out, chosen = best
    if (r_best, j_best) != (len(variants) - 1, len(errors[-1]) - 1):  # the last one run is installed
        _install(block, variants[r_best], j_best)
    for layer in chosen.values():
        layer.cache_weights, layer.kernel_cache = True, {}
    rotated = bool(made_rot) and (only_rotated or r_best == 1)
    st_of = {**stats, **{n: st for n, (_, st) in rotation.items()}} if rotated else stats
    entry: dict = {"linears": {n: relative_errors(variants[r_best][n].weight, chosen[n], st_of[n].x()[::4])
                               for n in chosen}}
    if len(errors[r_best]) > 1:
        entry["alternatives"] = {"token_rel_error": errors[r_best], "chosen": j_best}
    if made_rot:
        entry["rotation"] = {"kept": rotated}
        if len(variants) > 1:
            entry["rotation"].update(error_off=min(errors[0]), error_on=min(errors[1]))
    entry["block_output_rel_error"] = round(((q_out - fp_out).norm() / fp_out.norm().clamp_min(1e-12)).item(), 5)
    entry["block_token_rel_error"] = round(token_relative_error(q_out, fp_out), 6)
    return q_out, entry


def calibrate(model: nn.Module, arch: Arch, targets: dict, calib: torch.Tensor, config, method,
              quantize: bool = True, progress: bool = True, blocks_io=None, device=None, kv_observer=None,
              store: ActivationStore | None = None) -> dict:
    """Block-by-block calibration with ``method`` (a :class:`dgq.methods.Method`) on the resolved ``config``;
    ``targets``: full linear name -> :class:`dgq.api.Target`. With ``quantize=False`` only the smoothing folds are
    applied (the float model is folded and nothing is quantized).

    Per block: (1) statistics of every target's input on a float pass, (2) smoothing, (3) the method's candidate
    layers, the best one per block kept, (4) the quantized block's outputs feed the next block. Returns the log
    (per block: seconds, smoothing, per-linear errors, block output error).

    ``blocks_io`` (streaming, :mod:`dgq.stream`): an object whose ``load(i)`` puts block ``i``'s weights in place
    before its turn and ``done(i)`` takes the finished block away (written out, released); the other blocks stay
    unloaded.

    ``kv_observer`` (static KV scales, :class:`dgq.kvcache.KVObserver`): each finished block is run once more on
    its inputs to record the keys and values its attention caches (the quantized model's, as served).

    ``store`` (:class:`ActivationStore`): where the activations live (memory-mapped files beyond a budget).
    """
    blocks = get_blocks(model, arch)
    device = device if device is not None else next(model.parameters()).device
    residual_q = None
    if config.rotate_residual and arch.residual is not None:
        if getattr(model, "dgq_residual_rotation", None) != config.seed:
            raise DGQError("dgq internal error: rotate_residual needs rotation.rotate_residual_globals(model, ...) "
                           "before calibrate")
        residual_q = residual_matrix(model.config, config.seed).to(device)
    t0 = time.perf_counter()
    if blocks_io is not None:
        blocks_io.load(0)
    hidden, kwargs = capture_block_inputs(model, arch, calib, device, loaded=1 if blocks_io is not None else None,
                                          store=store)
    tokens_per_window = max(1, config.search_tokens // max(1, hidden.shape[0]))
    log = {"capture_seconds": round(time.perf_counter() - t0, 2), "blocks": []}
    if residual_q is not None:
        log["residual_rotation"] = {"size": int(residual_q.shape[0]), "seed": config.seed}
    bar = tqdm(range(len(blocks)), desc="calibrate", disable=not progress)
    for i in bar:
        tb = time.perf_counter()
        if blocks_io is not None and i > 0:
            blocks_io.load(i)
        block = blocks[i]
        if residual_q is not None:
            rotate_residual_block(block, arch, residual_q)
        prefix = f"{arch.blocks}.{i}."
        names = [n[len(prefix):] for n in targets if n.startswith(prefix)]
        stats, fp_out = collect_stats(block, names, hidden, kwargs[i], tokens_per_window, config.seed, i, device,
                                      full_hessian=method.full_hessian,
                                      token_hessian=method.wants_token_hessian(config), store=store)
        entry = {"block": i, "smoothed": {}, "linears": {}}
        premade: dict = {}
        if config.smooth:
            entry.update(smooth_block(block, arch, prefix, targets, stats, config, method, premade))
        h_in = hidden
        if quantize:
            rotation = (rotation_alternative(block, arch, stats, head_dim(model.config), config.seed)
                        if config.rotate in ("on", "measured") else None)
            hidden, q_entry = quantize_block(block, i, prefix, targets, stats, hidden, fp_out, kwargs[i], device,
                                             config, method, premade, store, rotation)
            del rotation
            entry.update(q_entry)
            bar.set_postfix(err=entry["block_output_rel_error"])
        else:
            hidden = fp_out if not entry["smoothed"] else run_block(block, hidden, kwargs[i], device, store=store)
        if kv_observer is not None:
            run_block(block, h_in, kwargs[i], device, kv_observer)
        del stats, fp_out, h_in
        if blocks_io is not None:
            blocks_io.done(i)
        entry["seconds"] = round(time.perf_counter() - tb, 2)
        log["blocks"].append(entry)
    log["seconds"] = round(time.perf_counter() - t0, 2)
    return log


@torch.no_grad()
def static_act_stats(model: nn.Module, calib: torch.Tensor, names: list[str], progress: bool = True) -> dict:
    """Per-window input absmax of every ``names`` linear from one float forward per window (no block-by-block
    pass): what data-free methods need for static activation scales (``LinearStats.static_scale``)."""
    stats = {n: LinearStats() for n in names}

    def on_input(name, x):
        stats[name].window_absmax.append(input_rows(x, name).abs().amax(0))

    with watch_inputs(model, names, on_input):
        for row in tqdm(calib, desc="calibrate", disable=not progress, leave=False):
            model(row[None].to(next(model.parameters()).device), use_cache=False)
    return stats
