"""The one declarative table of supported architectures.

For each family: where the decoder blocks live, which linears inside a block are quantized, and which module feeds
which linears (the smoothing mappings used by calibration): ``Smooth(src, dsts, kind)`` where ``kind`` is

- ``"norm"``: ``src`` is a norm whose output is ``x * w`` (``norm_offset=0``) or ``x * (offset + w)``
  (Gemma: ``offset=1``); smoothing divides what it multiplies by and scales the consumers' input columns.
- ``"linear"``: ``src`` is a linear whose output rows feed ``dsts`` through an op that is linear in them
  (``act(gate) * up`` -> down) or positively homogeneous (ReLU -> fc2); ``src_rows`` selects a row slice of a
  fused linear (Phi-3 ``gate_up_proj``: the up half).

``rotate`` names the attention's value projection and output projection, ``(v, o)``, where a per-head orthogonal
rotation folds exactly into them (:mod:`dgq.quant.rotate`; calibration's ``rotate`` option); None where it does not
(Phi-3's v rows sit inside the fused ``qkv_proj``).

``residual`` says where the residual stream can be rotated (calibration's ``rotate_residual``): the final norm (its
weight folds into ``lm_head``) and the block's linears that write to the stream; the readers are the ``"norm"``
smoothing mappings. None where a norm sits between a writer and the stream (Gemma 2/3's post-norms) or the norms
centre their input (OPT's LayerNorm): there the rotation does not commute with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .errors import DGQError


@dataclass(frozen=True)
class Smooth:
    src: str
    dsts: tuple[str, ...]
    kind: str = "norm"  # "norm" | "linear"
    src_rows: str | None = None  # None = all rows; "second_half" = up half of a fused gate_up


@dataclass(frozen=True)
class Residual:
    final_norm: str
    writers: tuple[str, ...]


@dataclass(frozen=True)
class Arch:
    family: str
    model_types: tuple[str, ...]
    blocks: str
    linears: tuple[str, ...]
    smooth: tuple[Smooth, ...] = field(default_factory=tuple)
    norm_offset: float = 0.0
    rotate: tuple[str, str] | None = None
    residual: Residual | None = None


_VO = ("self_attn.v_proj", "self_attn.o_proj")
_RES = Residual("model.norm", ("self_attn.o_proj", "mlp.down_proj"))
_LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_SMOOTH = (
    Smooth("input_layernorm", _QKV),
    Smooth("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Smooth("mlp.up_proj", ("mlp.down_proj",), kind="linear"),
)
_GEMMA2_SMOOTH = (
    Smooth("input_layernorm", _QKV),
    Smooth("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Smooth("mlp.up_proj", ("mlp.down_proj",), kind="linear"),
)

ARCHS: tuple[Arch, ...] = (
    Arch("llama", ("llama",), "model.layers", _LLAMA_LINEARS, _LLAMA_SMOOTH, rotate=_VO, residual=_RES),
    Arch("mistral", ("mistral",), "model.layers", _LLAMA_LINEARS, _LLAMA_SMOOTH, rotate=_VO, residual=_RES),
    Arch("qwen2", ("qwen2",), "model.layers", _LLAMA_LINEARS, _LLAMA_SMOOTH, rotate=_VO, residual=_RES),
    Arch("qwen3", ("qwen3",), "model.layers", _LLAMA_LINEARS, _LLAMA_SMOOTH, rotate=_VO, residual=_RES),
    Arch("gemma", ("gemma",), "model.layers", _LLAMA_LINEARS, _LLAMA_SMOOTH, norm_offset=1.0, rotate=_VO,
         residual=_RES),
    Arch("gemma2", ("gemma2",), "model.layers", _LLAMA_LINEARS, _GEMMA2_SMOOTH, norm_offset=1.0, rotate=_VO),
    Arch("gemma3", ("gemma3_text",), "model.layers", _LLAMA_LINEARS, _GEMMA2_SMOOTH, norm_offset=1.0, rotate=_VO),
    Arch("phi3", ("phi3",), "model.layers",
         ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
         (Smooth("input_layernorm", ("self_attn.qkv_proj",)),
          Smooth("post_attention_layernorm", ("mlp.gate_up_proj",)),
          Smooth("mlp.gate_up_proj", ("mlp.down_proj",), kind="linear", src_rows="second_half")),
         residual=_RES),
    Arch("opt", ("opt",), "model.decoder.layers",
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
         (Smooth("self_attn_layer_norm", _QKV),
          Smooth("final_layer_norm", ("fc1",)),
          Smooth("fc1", ("fc2",), kind="linear")), rotate=("self_attn.v_proj", "self_attn.out_proj")),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHS for t in a.model_types)


def arch_for_config(config) -> Arch:
    mt = getattr(config, "model_type", None)
    for a in ARCHS:
        if mt in a.model_types:
            return a
    raise DGQError(f"unsupported architecture {mt!r}; supported model types: {', '.join(supported_model_types())}")


def get_blocks(model: nn.Module, arch: Arch) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)


def block_linears(block: nn.Module, arch: Arch) -> dict[str, nn.Module]:
    return {name: block.get_submodule(name) for name in arch.linears}


def quantizable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module of every linear the architecture table says to quantize, in block order."""
    arch = arch_for_config(model.config)
    out = {}
    for i, block in enumerate(get_blocks(model, arch)):
        for rel, mod in block_linears(block, arch).items():
            out[f"{arch.blocks}.{i}.{rel}"] = mod
    return out


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace ``root``'s submodule at the dotted ``name`` (relative to ``root``) by ``new``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
