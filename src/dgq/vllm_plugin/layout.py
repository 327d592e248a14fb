"""What the vLLM plugin needs to know about a dgq checkpoint, in plain torch (no vLLM): which checkpoint linears
one vLLM layer runs, the tensors of each format and how each splits across tensor-parallel ranks, and the splits
that cannot work.

A vLLM layer may run several checkpoint linears as one (``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate, up): their
outputs are concatenated, so they must share the format, group size, activation mode and bias. Tensor parallelism
splits a column-parallel layer along its outputs (rows of every tensor: any split works) and a row-parallel layer
along its inputs K: the packed codes by K/2 bytes, the group scales and zeros by K/g groups. A rank's inputs must
therefore be whole groups (and an even count, two codes per byte); :func:`check_partition` refuses the rest.

Kinds of tensor (per output row ``n``): ``packed`` ``[N, K/2]`` (4-bit codes), ``group`` ``[N, K/g]``, ``full``
``[N, K]`` (int8 weight), ``channel`` ``[N]``; and ``tensor``, one scalar per checkpoint linear (the static
activation scale), never split.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from ..errors import DGQError
from ..formats import FORMATS
from ..qconfig import FORMAT_VERSION, check_header  # noqa: F401 - FORMAT_VERSION: the newest layout it reads

KINDS = ("packed", "group", "full", "channel", "tensor")


@dataclass(frozen=True)
class LayerSpec:
    """The checkpoint linears one vLLM layer runs (several when vLLM fuses them), all of one format."""

    names: tuple[str, ...]
    format: str
    group_size: int  # effective (K for per-channel formats)
    act_mode: str
    bias: bool
    in_features: int
    out_features: tuple[int, ...]


@cache
def tensor_kinds(fmt: str) -> dict[str, tuple[str, torch.dtype]]:
    """``name -> (kind, dtype)`` of a format's tensors, read off its module class (:data:`dgq.formats.FORMATS`) on
    the meta device, so the format stays the one source of its layout."""
    cls = FORMATS[fmt]
    n, k, g = 3, 32, 4  # sizes where K, K/2 and K/g differ
    m = cls(k, n, g, bias=False, act_mode=cls.act_modes[0], device="meta")
    k_groups = k // m.group_size
    shapes = {(n, k // 2): "packed", (n, k_groups): "group", (n, k): "full", (n,): "channel", (): "tensor"}
    if not m.grouped:  # one scale per row: nothing is split by groups
        shapes.pop((n, k_groups))
    out = {}
    for name, t in m.named_buffers():
        kind = shapes.get(tuple(t.shape))
        if kind is None:  # pragma: no cover - a new format with another layout must be described here first
            raise DGQError(f"the vLLM plugin does not know how to split the {fmt} tensor {name} {tuple(t.shape)}")
        out[name] = (kind, t.dtype)
    return out


def check_modules(q: dict) -> dict[str, dict]:
    """The ``modules`` of a dgq ``quantization_config``, checked for what the plugin reads; raises DGQError."""
    if not isinstance(q, dict) or q.get("quant_method") != "dgq":
        raise DGQError("not a dgq quantization_config (quant_method must be 'dgq')")
    check_header(q, "the checkpoint", reader="this plugin", upgrade="upgrade dgq in the vLLM environment")
    modules = q["modules"]
    types = {"in_features": int, "out_features": int, "group_size": int, "bias": bool, "act_mode": str}
    for name, spec in modules.items():
        if not isinstance(spec, dict):
            raise DGQError(f"dgq quantization_config: bad entry for {name} (not an object)")
        fmt = spec.get("format", "dgq")  # older checkpoints are all dgq
        if fmt not in FORMATS:
            raise DGQError(f"{name} has format {fmt!r}, which this dgq does not know ({', '.join(FORMATS)}); "
                           f"upgrade dgq in the vLLM environment")
        for key, typ in types.items():
            val = spec.get(key)
            if not isinstance(val, typ) or (typ is int and (isinstance(val, bool) or val < 1)):
                raise DGQError(f"dgq quantization_config: bad entry for {name} ({key}={val!r})")
        if spec["act_mode"] not in FORMATS[fmt].act_modes:
            raise DGQError(f"{name}: activation mode {spec['act_mode']!r} is not one the {fmt} format runs")
        if FORMATS[fmt].grouped and spec["in_features"] % spec["group_size"]:
            raise DGQError(f"{name}: group size {spec['group_size']} does not divide its {spec['in_features']} inputs")
    return modules


def layer_spec(prefix: str, modules: dict[str, dict], packed_mapping: dict[str, list[str]]) -> LayerSpec | None:
    """The checkpoint linears the vLLM layer ``prefix`` runs (``packed_mapping``: vLLM's fused name -> the
    checkpoint's names, e.g. ``qkv_proj -> [q_proj, k_proj, v_proj]``); None if none of them is quantized."""
    parent, _, last = prefix.rpartition(".")
    parts = packed_mapping.get(last, [last])
    names = tuple(f"{parent}.{p}" if parent else p for p in parts)
    specs = [modules.get(n) for n in names]
    if all(s is None for s in specs):
        return None
    if any(s is None for s in specs):
        quantized = [n for n, s in zip(names, specs, strict=True) if s is not None]
        raise DGQError(f"{prefix}: vLLM runs {', '.join(names)} as one layer, but the checkpoint quantizes only "
                       f"{', '.join(quantized)}; quantize all of them or none")
    first = specs[0]
    fmt = first.get("format", "dgq")
    group = first["in_features"] if not FORMATS[fmt].grouped else first["group_size"]
    for name, s in zip(names[1:], specs[1:], strict=True):
        theirs = (s.get("format", "dgq"), s["group_size"] if FORMATS[fmt].grouped else group, s["act_mode"],
                  s["bias"], s["in_features"])
        if theirs != (fmt, group, first["act_mode"], first["bias"], first["in_features"]):
            raise DGQError(f"{prefix}: vLLM runs {', '.join(names)} as one layer, but {name} differs from "
                           f"{names[0]} in format, group size, activation mode, bias or input size; they must agree")
    return LayerSpec(names, fmt, group, first["act_mode"], first["bias"], first["in_features"],
                     tuple(s["out_features"] for s in specs))


def check_partition(spec: LayerSpec, in_part: int, where: str) -> None:
    """Refuse a row-parallel split whose ``in_part`` inputs per rank are not whole groups (or an odd count of
    4-bit codes). Column-parallel splits (``in_part == in_features``) always work."""
    k, g = spec.in_features, spec.group_size
    if in_part == k:
        return
    if k % in_part:
        raise DGQError(f"{where}: {in_part} of {k} inputs per rank is not an even split")
    tp = k // in_part
    kinds = {kind for kind, _ in tensor_kinds(spec.format).values()}
    if "group" in kinds and in_part % g:
        head = (f"{where}: tensor parallel size {tp} gives each rank {in_part} of its {k} inputs, which does not "
                f"fall on a group boundary")
        fix = f"quantize with a group size dividing {in_part}"
        if k == g:
            raise DGQError(f"{head}: the layer has a single group per row (group size {g}), so no row-parallel "
                           f"split can keep its groups whole; {fix}")
        ok = [d for d in range(1, k // g + 1) if (k // g) % d == 0]
        raise DGQError(f"{head} (group size {g}, {k // g} groups); a row-parallel split of the {spec.format} format "
                       f"must give each rank whole groups: use a tensor parallel size that divides {k // g} "
                       f"({', '.join(map(str, ok))}) or {fix}")
    if "packed" in kinds and in_part % 2:
        raise DGQError(f"{where}: tensor parallel size {tp} gives each rank {in_part} inputs, an odd count; "
                       f"4-bit codes are packed two per byte")


def partition_shapes(spec: LayerSpec, in_part: int, out_part: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a rank's tensors: ``out_part`` outputs (summed over the fused linears), ``in_part`` inputs."""
    g = spec.group_size if FORMATS[spec.format].grouped else in_part
    dims = {"packed": (out_part, in_part // 2), "group": (out_part, in_part // g), "full": (out_part, in_part),
            "channel": (out_part,), "tensor": (len(spec.names),)}
    return {name: dims[kind] for name, (kind, _) in tensor_kinds(spec.format).items()}


def shard(t: torch.Tensor, kind: str, rank: int, tp: int, parallel: str) -> torch.Tensor:
    """Rank ``rank``'s part of one linear's tensor ``t`` of this kind, as vLLM's parameter classes cut it
    (``parallel``: ``column`` splits the outputs, ``row`` the inputs). The plugin leaves the cutting to vLLM; this
    states the same rule for tests and tools."""
    if kind == "tensor":
        return t
    if parallel == "column":
        dim = 0
    elif parallel == "row":
        if kind == "channel":
            return t
        dim = 1
    else:
        raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")
    size = t.shape[dim] // tp
    return t.narrow(dim, rank * size, size)
