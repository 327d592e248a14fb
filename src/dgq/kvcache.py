"""INT8 KV cache (method spec §5): the third quantized tensor, a transformers ``Cache``.

Two modes, both symmetric int8 in [-127, 127]:

- ``int8`` (dynamic): one float32 scale per token and per KV head, ``absmax / 127`` of that head's vector (the
  KIVI / QServe granularity for keys and values). Nothing to calibrate; new tokens never change old scales.
- ``int8-static``: one float32 scale per layer for K and one for V, ``absmax / 127`` over calibration tokens (the
  original release's per-tensor scales, taken after RoPE); values beyond the calibrated range are clipped.
- ``int8-smooth``: ``int8`` after dividing each key channel by ``λ`` = its absmax over calibration tokens (per layer,
  KV head and channel; QServe's SmoothAttention applied at the cache — a kernel would multiply the query by ``λ``
  instead). A few key channels with large, token-independent magnitudes (Qwen2's k_proj biases) otherwise set every
  token's scale and flatten the other channels. Values as ``int8``.

The cache stores int8 keys/values (``[batch, kv_heads, tokens, head_dim]``) and their scales, and hands attention
the **dequantized** states of every cached position, the current step's included: attention always reads what a
kernel reading the int8 cache would read, in prefill as in decode, eager or sdpa alike. A single forward therefore
exercises the quantization as much as prefill + token-by-token decoding does (``tests/test_kvcache.py`` checks that
the two agree).

:func:`enable` makes a model use the cache by itself: a forward pre-hook gives every call that brings no cache (or
the empty ``DynamicCache`` that ``generate`` makes) a fresh :class:`Int8KVCache`, so ``model(x)``, ``generate``,
perplexity and zero-shot evaluation all run on int8 K/V. Only full-attention decoder layers are supported; models
with sliding-window, chunked, shared or linear-attention layers are refused with the reason.

Runtime code: imports no calibration or method module. :func:`observe` (for the static scales) runs a model or a
block with a :class:`KVObserver`, which records the absmax of what attention would cache and stores nothing.
"""

from __future__ import annotations

import inspect
import logging

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .errors import DGQError

KV_MODES = ("none", "int8", "int8-static", "int8-smooth")
CALIBRATED = ("int8-static", "int8-smooth")
QMAX = 127.0
log = logging.getLogger("dgq")


# -- the layout a static scale belongs to ---------------------------------------------------------------------------
def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layout(config) -> dict:
    """The attention geometry the cache (and static scales) are built for."""
    c = _text_config(config)
    heads = c.num_attention_heads
    return {"num_hidden_layers": int(c.num_hidden_layers),
            "num_key_value_heads": int(getattr(c, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(c, "head_dim", None) or c.hidden_size // heads)}


def unsupported(config) -> str | None:
    """Why this model's attention cannot use the int8 cache, or None when it can."""
    c = _text_config(config)
    kind = getattr(c, "model_type", "this model")
    types = getattr(c, "layer_types", None)
    if types is None:
        if getattr(c, "sliding_window", None) is not None and getattr(c, "use_sliding_window", True):
            types = ["sliding_attention"]
        elif getattr(c, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"]
        else:
            types = ["full_attention"]
    other = sorted({t for t in types if t != "full_attention"})
    if other:
        i = next(i for i, t in enumerate(types) if t != "full_attention")
        return (f"{kind} has {', '.join(other)} layers (layer {i}); dgq's int8 KV cache supports full-attention "
                f"layers only")
    if getattr(c, "kv_sharing_modes", None) is not None:
        return f"{kind} shares KV caches between layers; dgq's int8 KV cache does not"
    return None


def check_mode(mode: str) -> str:
    if mode not in KV_MODES:
        raise DGQError(f"unknown KV cache mode {mode!r}; choose one of: {', '.join(KV_MODES)}")
    return mode


# -- quantization -------------------------------------------------------------------------------------------------
def quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector (last dim) symmetric int8: ``(q int8, scale float32 [..., 1])``; a zero vector gets scale 1."""
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True) / QMAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(xf / s), -QMAX, QMAX).to(torch.int8), s


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x.float() / scale), -QMAX, QMAX).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


class Int8KVLayer(DynamicLayer):
    """One decoder layer's int8 K/V. ``keys``/``values`` hold the int8 tensors (so generic code reading their
    shapes sees ``[batch, kv_heads, tokens, head_dim]``); ``key_scales``/``value_scales`` hold the float32 scales
    (``[batch, kv_heads, tokens, 1]`` dynamic, 0-d static)."""

    def __init__(self, k_scale: float | None = None, v_scale: float | None = None, k_smooth=None, **kwargs):
        super().__init__(**kwargs)
        self.static = k_scale is not None
        if self.static != (v_scale is not None):
            raise DGQError("a static int8 KV layer needs both a key and a value scale")
        self._static_scales = (k_scale, v_scale)
        self._k_smooth = None if k_smooth is None else torch.as_tensor(k_smooth, dtype=torch.float32)
        self.k_smooth = None  # [kv_heads, 1, head_dim] on the states' device, from the first update
        self.key_scales = self.value_scales = None
        self.dtype = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        b, h, _, d = key_states.shape
        if self._k_smooth is not None:
            if tuple(self._k_smooth.shape) != (h, d):
                raise DGQError(f"key smoothing factors of shape {tuple(self._k_smooth.shape)} for keys of {h} heads x "
                               f"{d} channels")
            self.k_smooth = self._k_smooth.to(self.device)[:, None, :]
        self.keys = torch.empty(b, h, 0, d, dtype=torch.int8, device=self.device)
        self.values = torch.empty(b, value_states.shape[1], 0, value_states.shape[-1], dtype=torch.int8,
                                  device=self.device)
        if self.static:
            k, v = self._static_scales
            self.key_scales = torch.tensor(float(k), dtype=torch.float32, device=self.device)
            self.value_scales = torch.tensor(float(v), dtype=torch.float32, device=self.device)
        else:
            self.key_scales = torch.empty(b, h, 0, 1, dtype=torch.float32, device=self.device)
            self.value_scales = torch.empty(b, value_states.shape[1], 0, 1, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def _append(self, states: torch.Tensor, q_all: torch.Tensor, s_all: torch.Tensor):
        if self.static:
            return torch.cat([q_all, quantize_static(states, s_all)], dim=-2), s_all
        q, s = quantize_dynamic(states)
        return torch.cat([q_all, q], dim=-2), torch.cat([s_all, s], dim=-2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        dtype = key_states.dtype
        if self.k_smooth is not None:
            self.keys, self.key_scales = self._append(key_states.float() / self.k_smooth, self.keys, self.key_scales)
            keys = (self.keys.float() * (self.key_scales * self.k_smooth)).to(dtype)
        else:
            self.keys, self.key_scales = self._append(key_states, self.keys, self.key_scales)
            keys = dequantize(self.keys, self.key_scales, dtype)
        self.values, self.value_scales = self._append(value_states, self.values, self.value_scales)
        return keys, dequantize(self.values, self.value_scales, dtype)

    def nbytes(self) -> int:
        """Bytes held: int8 states and their scales."""
        if not self.is_initialized:
            return 0
        extra = 0 if self.k_smooth is None else self.k_smooth.numel() * 4
        return extra + sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.key_scales,
                                                                    self.value_scales))

    # every operation on the token or batch axis applies to the dynamic scales as well
    def _each(self, fn) -> None:
        self.keys, self.values = fn(self.keys), fn(self.values)
        if not self.static:
            self.key_scales, self.value_scales = fn(self.key_scales), fn(self.value_scales)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._each(lambda t: t[..., :tokens_to_remove, :])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self._each(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._each(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._each(lambda t: t[indices, ...])

    def offload(self):
        if self.is_initialized:
            self._each(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._each(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.key_scales = self.value_scales = None
        super().reset()


class Int8KVCache(DynamicCache):
    """A ``DynamicCache`` whose layers store int8 K/V (see the module docstring). ``scales``: for ``int8-static``,
    ``{"k_scale": [...], "v_scale": [...]}`` with one float per decoder layer; for ``int8-smooth``,
    ``{"k_smooth": [...]}`` with one ``[kv_heads][head_dim]`` list per decoder layer."""

    def __init__(self, config, mode: str = "int8", scales: dict | None = None):
        check_mode(mode)
        if mode == "none":
            raise DGQError("Int8KVCache needs mode int8 or int8-static")
        why = unsupported(config)
        if why:
            raise DGQError(f"--kv {mode}: {why}")
        n = layout(config)["num_hidden_layers"]
        if mode == "int8-static":
            if not scales or len(scales.get("k_scale", ())) != n or len(scales.get("v_scale", ())) != n:
                raise DGQError(f"--kv int8-static needs one key and one value scale per layer ({n} layers)")
            layers = [Int8KVLayer(k, v) for k, v in zip(scales["k_scale"], scales["v_scale"], strict=True)]
        elif mode == "int8-smooth":
            if not scales or len(scales.get("k_smooth", ())) != n:
                raise DGQError(f"--kv int8-smooth needs key smoothing factors for each of the {n} layers")
            layers = [Int8KVLayer(k_smooth=f) for f in scales["k_smooth"]]
        else:
            layers = [Int8KVLayer() for _ in range(n)]
        Cache.__init__(self, layers=layers)
        self.mode = mode

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


# -- making a model use it ------------------------------------------------------------------------------------------
def cache_kwarg(module: torch.nn.Module) -> str:
    """The name ``module.forward`` takes its cache under (``cache`` in transformers 5.x, ``past_key_values``
    before)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _fresh(cache) -> bool:
    """A cache made by ``generate`` (or a caller) that holds nothing yet and is not an int8 cache."""
    return (type(cache) is DynamicCache and cache.get_seq_length() == 0
            and not getattr(cache, "_is_user_defined", False))


def enable(model: torch.nn.Module, mode: str, scales: dict | None = None) -> torch.nn.Module:
    """Make every forward of ``model`` run on an int8 KV cache (``mode`` int8 or int8-static; ``none`` removes it).
    Checked before anything changes: the architecture (full attention only) and, for static scales, one scale per
    layer. Returns the model."""
    check_mode(mode)
    old = getattr(model, "_dgq_kv_hook", None)
    if mode != "none":
        Int8KVCache(model.config, mode, scales)  # every check, before the model is touched
    if old is not None:
        old.remove()
        model._dgq_kv_hook = None
    model.dgq_kv = {"mode": mode, **({"k_scale": list(scales["k_scale"]), "v_scale": list(scales["v_scale"])}
                                     if mode == "int8-static" else {}),
                    **({"k_smooth": list(scales["k_smooth"])} if mode == "int8-smooth" else {})}
    if mode == "none":
        return model
    if mode == "int8-smooth":  # tensors once, not per forward
        scales = {**scales, "k_smooth": [torch.as_tensor(f, dtype=torch.float32) for f in scales["k_smooth"]]}
    model._dgq_kv_scales = scales
    name = cache_kwarg(model)

    def hook(mod, args, kwargs):
        cache = kwargs.get(name, kwargs.get("past_key_values"))
        if cache is None or _fresh(cache):
            kwargs.pop("past_key_values", None)
            # with use_cache=False too: the caller keeps no cache, attention still reads int8 K/V
            kwargs[name] = Int8KVCache(mod.config, mode, scales)
            return args, kwargs
        if not isinstance(cache, Int8KVCache) and not getattr(mod, "_dgq_kv_warned", False):
            mod._dgq_kv_warned = True
            log.warning("dgq: a caller-supplied %s (not empty, or not a DynamicCache) is used as it is: this call "
                        "does not run on the model's %s KV cache", type(cache).__name__, mode)
        return None

    model._dgq_kv_hook = model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def new_cache(model: torch.nn.Module):
    """The cache a forward of ``model`` would use: an :class:`Int8KVCache` when :func:`enable` is on, else a
    ``DynamicCache``."""
    kv = getattr(model, "dgq_kv", None) or {"mode": "none"}
    if kv["mode"] == "none":
        return DynamicCache(config=model.config)
    return Int8KVCache(model.config, kv["mode"], getattr(model, "_dgq_kv_scales", None))


# -- static scales ---------------------------------------------------------------------------------------------------
class _ObserverLayer(DynamicLayer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.k_absmax = self.v_absmax = 0.0
        self.k_channel = None  # [kv_heads, head_dim] running absmax of the keys

    def update(self, key_states, value_states, *args, **kwargs):
        if not bool(torch.isfinite(key_states).all() and torch.isfinite(value_states).all()):
            raise DGQError("NaN/Inf in the key/value states while calibrating the static KV scales")
        ch = key_states.detach().abs().amax(dim=(0, 2)).float()
        self.k_channel = ch if self.k_channel is None else torch.maximum(self.k_channel, ch)
        self.k_absmax = max(self.k_absmax, key_states.detach().abs().max().item())
        self.v_absmax = max(self.v_absmax, value_states.detach().abs().max().item())
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0


class KVObserver(DynamicCache):
    """A cache that stores nothing and records, per layer, the absmax of the keys (after RoPE) and values attention
    would cache."""

    def __init__(self, config, mode: str = "int8-static"):
        why = unsupported(config)
        if why:
            raise DGQError(f"--kv {mode}: {why}")
        Cache.__init__(self, layers=[_ObserverLayer() for _ in range(layout(config)["num_hidden_layers"])])

    def scales(self) -> dict:
        """``{"k_scale": [...], "v_scale": [...]}``: absmax / 127 per layer (a layer never seen is an error), and
        ``"k_smooth"``: per layer, the ``[kv_heads][head_dim]`` key channel absmax (floored at 1e-4 of the
        layer's, 6 significant digits: the same factors divide and multiply back, so their rounding costs
        nothing)."""
        unseen = [i for i, la in enumerate(self.layers) if la.k_channel is None]
        if unseen:
            raise DGQError(f"static KV scales: layer {unseen[0]} saw no key/value states during calibration")
        smooth = []
        for la in self.layers:
            f = la.k_channel.clamp_min(max(la.k_absmax, 1e-8) * 1e-4).cpu()
            smooth.append([[float(f"{x:.6g}") for x in row] for row in f.tolist()])
        return {"k_scale": [max(la.k_absmax, 1e-8) / QMAX for la in self.layers],
                "v_scale": [max(la.v_absmax, 1e-8) / QMAX for la in self.layers],
                "k_smooth": smooth}


@torch.no_grad()
def observe(model: torch.nn.Module, windows: torch.Tensor, observer: KVObserver | None = None) -> KVObserver:
    """Run ``model`` (no int8 cache of its own) on every window with an observer cache and return it."""
    observer = observer if observer is not None else KVObserver(model.config)
    device = next(model.parameters()).device
    name = cache_kwarg(model)
    hook = getattr(model, "_dgq_kv_hook", None)
    if hook is not None:
        raise DGQError("calibrate static KV scales on a model without an int8 KV cache (dgq.kvcache.enable "
                       "with mode none first)")
    for row in windows:
        model(row[None].to(device), **{name: observer})
    return observer


def check_layout(kv: dict, config, where: str) -> None:
    """A checkpoint's ``kv_cache`` entry against the model it is loaded into (static scales belong to one head
    layout)."""
    mode = kv.get("mode") if isinstance(kv, dict) else None
    if mode not in KV_MODES:
        raise DGQError(f"{where}: bad kv_cache entry in quantization_config ({kv!r})")
    if mode == "none":
        return
    want = kv.get("layout")
    have = layout(config)
    if want != have:
        diff = ", ".join(f"{k} {want.get(k) if isinstance(want, dict) else None} vs {v}" for k, v in have.items()
                         if not isinstance(want, dict) or want.get(k) != v)
        raise DGQError(f"{where}: the {mode} KV cache was made for another attention layout "
                       f"(checkpoint vs model: {diff})")
    if mode == "int8-smooth":
        f = kv.get("k_smooth")
        shape = (have["num_hidden_layers"], have["num_key_value_heads"], have["head_dim"])
        ok = isinstance(f, list) and len(f) == shape[0] and all(
            isinstance(h, list) and len(h) == shape[1] and all(
                isinstance(c, list) and len(c) == shape[2]
                and all(isinstance(x, (int, float)) and 0 < x < float("inf") for x in c) for c in h) for h in f)
        if not ok:
            raise DGQError(f"{where}: kv_cache.k_smooth must hold {shape[0]} x {shape[1]} x {shape[2]} positive "
                           f"finite factors")
    if mode == "int8-static":
        n = have["num_hidden_layers"]
        for key in ("k_scale", "v_scale"):
            s = kv.get(key)
            if (not isinstance(s, list) or len(s) != n
                    or not all(isinstance(x, (int, float)) and 0 < x < float("inf") for x in s)):
                raise DGQError(f"{where}: kv_cache.{key} must list {n} positive finite scales")
