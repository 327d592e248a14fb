"""dgq checkpoints as compressed-tensors checkpoints (what vLLM and transformers' compressed-tensors loader read).

Targets (one ``config_groups`` entry, ``targets: ["Linear"]``; every other linear, ``lm_head`` included, is listed
in ``ignore`` and stays float; embeddings, norms and biases are copied in the checkpoint's dtype):

``ct-w8a8`` — format ``int-quantized``: per module ``weight`` int8 ``[N, K]``, ``weight_scale`` float32 ``[N, 1]``
    (symmetric per channel, no zero point), int8 symmetric activations per token (``dynamic: true``) or, for a
    checkpoint with static activations, per tensor with ``input_scale`` float32 ``[1]``. DGQ modules give
    ``weight = s_int·(q − z)`` (the exact int8 weight dgq's kernels multiply) and ``weight_scale = s_ch``; dgq's
    own W8A8 modules give their ``weight`` and ``channel_scale``. Lossless: ``weight·weight_scale`` is dgq's
    dequantized weight bit for bit. (Activation rounding: dgq quantizes to −127..127 with ``absmax/127``; vLLM's
    int8 kernels do the same; compressed-tensors' own float emulation uses ``absmax/127.5`` and −128..127.)
``ct-w4a16`` — format ``pack-quantized``: asymmetric int4 per group of dgq's group size, float activations: per
    module ``weight_packed`` int32 ``[N, ceil(K/8)]`` (eight signed codes ``q − 8`` per word, offset back to
    ``q`` and packed low nibble first), ``weight_zero_point`` int32 ``[ceil(N/8), G]`` (``z − 8`` packed the same
    way along the rows), ``weight_scale`` ``[N, G]`` in the checkpoint's float dtype and ``weight_shape`` int64
    ``[2]``. DGQ modules give ``weight_scale = s_ch·s_int`` (the product in float32, then rounded to nearest in the
    scale dtype: one rounding, relative error ≤ 2⁻¹¹ in float16, 2⁻⁸ in bfloat16, 2⁻²⁴ in float32, plus float32's
    own rounding of the product); W4A16 (GPTQ/AWQ/RTN) modules give their float16 scales (exact unless the scale
    dtype is bfloat16). DGQ modules with int8 activations become weight-only (the activations stay float).

The export streams: one quantized module (or copied tensor) at a time from the source's files, written into shards
of at most ``max_shard_size``; nothing exists at ``out`` until everything is written (a temporary folder renamed).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from .._version import __version__
from ..checkpoint import (
    INDEX,
    CheckpointWriter,
    check_sizes,
    model_config,
    parse_size,
    read_quantization_config,
    tensor_index,
    verify_checksums,
    without_guard,
)
from ..errors import DGQError
from ..formats import DGQWeight, W4Weight, W8Weight
from ..formats.packing import unpack_uint4
from ..fsutil import EXPORT_KEY, atomic_folder, check_output_dir

log = logging.getLogger("dgq")

TARGETS = ("ct-w8a8", "ct-w4a16")
CT_FORMAT = {"ct-w8a8": "int-quantized", "ct-w4a16": "pack-quantized"}
# the tensors of each dgq format's module (besides an optional bias)
SOURCE_TENSORS = {"dgq": ("qweight", "zeros", "scales", "channel_scale", "act_scale"),
                  "w8a8": ("weight", "channel_scale", "act_scale"),
                  "w4a16": ("qweight", "scales", "zeros")}
EXPORT_MAX_SHARD = "2GB"  # the shard being written is held in memory
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# -- int4 packing as compressed-tensors packs it ------------------------------------------------------------------
def pack_int4_codes(codes: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Pack unsigned 4-bit values (0..15; compressed-tensors' signed ``v − 8`` plus its offset 8) eight per int32
    along ``dim``, element ``i`` of each run of eight at bits ``4·i`` (compressed-tensors' ``pack_to_int32`` for
    ``num_bits=4``; a partial last word is padded with 0)."""
    v = codes.to(torch.int64)
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    pad = -cols % 8
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.view(rows, -1, 8) << (4 * torch.arange(8, dtype=torch.int64))
    words = v.sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed
    return (words.t() if dim == 0 else words).contiguous()


# -- reading the source ---------------------------------------------------------------------------------------------
class Source:
    """A dgq checkpoint read tensor by tensor (one open file at a time)."""

    def __init__(self, path: Path, verify: bool):
        self.path = path
        self.cfg, self.q = read_quantization_config(path)
        if verify:
            verify_checksums(path, self.cfg, self.q)
        self.names = tensor_index(path)
        check_sizes(path, self.cfg, self.names)
        self.config = model_config(path, self.cfg)
        self._file, self._handle = None, None

    def get(self, name: str) -> torch.Tensor:
        fname = self.names[name][0]
        if fname != self._file:
            self._handle = safe_open(self.path / fname, framework="pt")
            self._file = fname
        try:
            return self._handle.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated files
            raise DGQError(f"{self.path}: {fname} is unreadable ({type(e).__name__})") from None


# -- the plan: refuse before writing ---------------------------------------------------------------------------------
def plan(src: Source, target: str) -> dict:
    """Check that ``target`` can hold every quantized module; return what the config needs."""
    mods = src.q["modules"]
    kinds = {}
    for name, spec in mods.items():
        kind = spec.get("format", "dgq") if isinstance(spec, dict) else None
        if kind not in SOURCE_TENSORS:
            raise DGQError(f"{src.path}: module {name} has format {kind!r}, which dgq export does not know")
        act = spec.get("act_mode")
        if target == "ct-w8a8" and (kind == "w4a16" or act == "none"):
            raise DGQError(f"{src.path}: module {name} is {kind} with float activations; ct-w8a8 holds int8 "
                           f"activations only: export it with --to ct-w4a16")
        if target == "ct-w4a16" and kind == "w8a8":
            raise DGQError(f"{src.path}: module {name} has 8-bit weights (w8a8); ct-w4a16 holds 4-bit weights "
                           f"only: export it with --to ct-w8a8")
        kinds[name] = kind
    acts = {mods[n].get("act_mode") for n in mods}
    groups = {mods[n].get("group_size") for n in mods}
    if target == "ct-w8a8" and len(acts) > 1:
        raise DGQError(f"{src.path}: modules mix activation modes ({', '.join(sorted(map(str, acts)))}); "
                       f"ct-w8a8 writes one scheme for all")
    if target == "ct-w4a16" and len(groups) > 1:
        raise DGQError(f"{src.path}: modules mix group sizes ({', '.join(sorted(map(str, groups)))}); ct-w4a16 "
                       f"writes one scheme for all")
    with torch.device("meta"):
        try:
            skeleton = AutoModelForCausalLM.from_config(src.config)
        except Exception as e:  # noqa: BLE001 - bad sizes surface as many exception types
            raise DGQError(f"{src.path}: cannot build the model from config.json ({type(e).__name__})") from None
    linears = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
    missing = sorted(set(mods) - set(linears))
    if missing:
        raise DGQError(f"{src.path}: quantized module {missing[0]} is not a linear of this architecture")
    # the float tensors: every one transformers expects (tied ones once), none it does not know
    owned = {f"{m}.{k}" for m in mods for k in SOURCE_TENSORS[kinds[m]]}
    persistent = set(skeleton.state_dict())
    all_params = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)}
    expected = {n for n, _ in skeleton.named_parameters()} | (persistent - all_params)
    expected -= {f"{m}.weight" for m in mods}
    missing = sorted(expected - set(src.names))
    if missing:
        raise DGQError(f"{src.path}: tensor {missing[0]} is missing from the weights")
    unknown = sorted(set(src.names) - owned - persistent - {n for n, _ in skeleton.named_buffers()})
    if unknown:
        raise DGQError(f"{src.path}: the weights hold a tensor this model does not have: {unknown[0]}")
    return {"kinds": kinds, "act": acts.pop(), "group_size": groups.pop(), "owned": owned,
            "ignore": [n for n in linears if n not in mods], "persistent": persistent}


def quantization_config(target: str, p: dict) -> dict:
    """The compressed-tensors ``quantization_config`` (the fields compressed-tensors' ``QuantizationConfig``
    dumps)."""
    if target == "ct-w8a8":
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel",
                   "dynamic": False}
        static = p["act"] == "static"
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                "strategy": "tensor" if static else "token", "dynamic": not static}
    else:
        weights = {"num_bits": 4, "type": "int", "symmetric": False, "group_size": p["group_size"],
                   "strategy": "group", "dynamic": False}
        acts = None
    return {
        "quant_method": "compressed-tensors",
        "format": CT_FORMAT[target],
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                      "output_activations": None, "format": CT_FORMAT[target]}},
        "ignore": p["ignore"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


# -- one module -------------------------------------------------------------------------------------------------
def _container(src: Source, name: str, kind: str, spec: dict):
    t = {k: src.get(f"{name}.{k}") for k in SOURCE_TENSORS[kind] if f"{name}.{k}" in src.names}
    for k in SOURCE_TENSORS[kind]:
        if k not in t:
            raise DGQError(f"{src.path}: tensor {name}.{k} is missing from the weights")
    g = spec.get("group_size")
    if kind == "dgq":
        w = DGQWeight(t["qweight"], t["zeros"], t["scales"], t["channel_scale"], g)
    elif kind == "w8a8":
        w = W8Weight(t["weight"], t["channel_scale"])
    else:
        w = W4Weight(t["qweight"], t["scales"], t["zeros"], g)
    w.check(f"{src.path}: {name}")
    if tuple(w.shape) != (spec.get("out_features"), spec.get("in_features")):
        raise DGQError(f"{src.path}: {name} holds a {tuple(w.shape)} weight, its config entry says "
                       f"{(spec.get('out_features'), spec.get('in_features'))}")
    return w, t.get("act_scale")


def module_w8a8(src: Source, name: str, kind: str, spec: dict) -> dict[str, torch.Tensor]:
    w, act_scale = _container(src, name, kind, spec)
    out = {f"{name}.weight": w.int8().contiguous(),
           f"{name}.weight_scale": (w.channel_scale if kind == "dgq" else w.scale).float().reshape(-1, 1).clone()}
    if spec.get("act_mode") == "static":
        s = act_scale.float().reshape(1).clone()
        if not (bool(torch.isfinite(s).all()) and float(s) > 0):
            raise DGQError(f"{src.path}: {name} has static activations with act_scale {float(s)}; corrupt weights")
        out[f"{name}.input_scale"] = s
    return out


def module_w4a16(src: Source, name: str, kind: str, spec: dict, scale_dtype: torch.dtype) -> dict:
    w, _ = _container(src, name, kind, spec)
    n, k = w.shape
    if kind == "dgq":
        scale = w.channel_scale.float()[:, None] * w.scales.float()
    else:
        scale = w.scales
    return {f"{name}.weight_packed": pack_int4_codes(unpack_uint4(w.qweight)),
            f"{name}.weight_scale": scale.to(scale_dtype).contiguous(),
            f"{name}.weight_zero_point": pack_int4_codes(w.zeros.to(torch.int64), dim=0),
            f"{name}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}


# -- the export ---------------------------------------------------------------------------------------------------
def export(ckpt, to: str, out, force: bool = False, verify: bool = True, max_shard_size=EXPORT_MAX_SHARD) -> Path:
    """Convert the dgq checkpoint ``ckpt`` into a compressed-tensors checkpoint at ``out`` (see the module
    docstring). Everything is checked before anything is written."""
    if to not in TARGETS:
        raise DGQError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")
    path = Path(ckpt).expanduser()
    if not path.is_dir():
        raise DGQError(f"checkpoint not found: {path}")
    max_bytes = parse_size(max_shard_size)
    outp = check_output_dir(out, force)
    if outp.resolve() == path.resolve():
        raise DGQError(f"output {outp} is the checkpoint being exported; choose another folder")
    src = Source(path, verify)
    p = plan(src, to)
    kv = (src.q.get("kv_cache") or {}).get("mode", "none")
    if kv != "none":  # compressed-tensors' kv_cache_scheme is fp8 in vLLM: int8 K/V has no place there
        log.warning("dgq: the %s KV cache of %s is not carried into %s (the export's KV cache is the engine's "
                    "default)", kv, path, to)
    mods = src.q["modules"]
    scale_dtype = _source_dtype(src)
    owned = p["owned"]
    with atomic_folder(outp, replace=True) as tmp:
        w = CheckpointWriter(tmp, max_bytes)
        done = set()
        for name in sorted(src.names, key=lambda n: (src.names[n][0], n)):  # file order: one file open at a time
            if name in owned:
                mod = name.rsplit(".", 1)[0]
                if mod in done:
                    continue
                spec, kind = mods[mod], p["kinds"][mod]
                w.add(module_w8a8(src, mod, kind, spec) if to == "ct-w8a8"
                      else module_w4a16(src, mod, kind, spec, scale_dtype))
                done.add(mod)
            elif name in p["persistent"]:
                w.add({name: src.get(name)})  # embeddings, norms, biases, lm_head: as they are
            # else: buffers transformers does not save (rotary tables)
        w.finish_weights()
        cfg = without_guard(src.cfg)
        cfg["quantization_config"] = quantization_config(to, p)
        cfg[EXPORT_KEY] = {"target": to, "source": path.name, "dgq_version": __version__,  # no local paths
                           **{k: src.q.get(k) for k in ("method", "format", "group_size", "act")}}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for f in sorted(path.iterdir()):  # tokenizer files, generation config, chat template
            if f.is_file() and not f.is_symlink() and f.name != "config.json" and f.name != INDEX \
                    and not f.name.endswith(".safetensors"):
                shutil.copyfile(f, tmp / f.name)
    return outp


def _source_dtype(src: Source) -> torch.dtype:
    """The checkpoint's float dtype: its config's ``dtype``/``torch_dtype``, else float32."""
    dt = src.cfg.get("dtype") or src.cfg.get("torch_dtype")
    return FLOAT_DTYPES.get(str(dt).replace("torch.", ""), torch.float32)
