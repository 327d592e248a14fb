"""Exact rotations folded into the float model around calibration (the math is :mod:`dgq.quant.rotate`):

- the per-head value rotation (``DGQConfig.rotate``): v_proj's rows and o_proj's input columns of one block, made
  as an alternative that calibration keeps or drops per block (:func:`rotation_alternative`);
- the residual-stream rotation (``DGQConfig.rotate_residual``): the embeddings, the final norm and ``lm_head`` once
  (:func:`rotate_residual_globals`, before calibration starts), then each block at its turn
  (:func:`rotate_residual_block`). Tied embeddings are untied (the head also takes the final norm's weight); the
  model stays a plain transformers model of its family with unit norm weights.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from .arch import Arch
from .quant import rotate as rot

log = logging.getLogger("dgq")


def head_dim(model_config) -> int:
    """The attention head size of a transformers config."""
    d = getattr(model_config, "head_dim", None)
    return int(d) if d else model_config.hidden_size // model_config.num_attention_heads


@torch.no_grad()
def rotation_alternative(block: nn.Module, arch: Arch, stats: dict, d: int, seed: int) -> dict:
    """The block's value/output projections with every head rotated by :func:`dgq.quant.rotate.orthogonal_matrix`
    (exact; see :mod:`dgq.quant.rotate`) and their statistics: name -> (rotated float linear, stats). Empty where the
    arch table has no rotation or either projection is not quantized."""
    if arch.rotate is None or not all(n in stats for n in arch.rotate):
        return {}
    v, o = arch.rotate
    q = rot.orthogonal_matrix(d, seed)
    lin_v, lin_o = copy.deepcopy(block.get_submodule(v)), copy.deepcopy(block.get_submodule(o))
    lin_v.weight.copy_(rot.rotate_rows(lin_v.weight, q))
    if lin_v.bias is not None:
        lin_v.bias.copy_(rot.rotate_rows(lin_v.bias, q))
    lin_o.weight.copy_(rot.rotate_columns(lin_o.weight, q))
    return {v: (lin_v, stats[v]), o: (lin_o, stats[o].rotated(q))}


def residual_matrix(model_config, seed: int) -> torch.Tensor:
    """The residual stream's rotation (hidden × hidden, float64) for this model and seed."""
    return rot.orthogonal_matrix(model_config.hidden_size, seed)


def _fold_norm(norm: nn.Module, readers: list[nn.Module], offset: float) -> None:
    """The norm's per-channel weight moved into its readers' input columns; the norm then multiplies by one."""
    g = offset + norm.weight.detach().float()
    for lin in readers:
        lin.weight.copy_((lin.weight.float() * g.to(lin.weight.device)[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0 - offset)


def _rotate_in_rows(w: torch.Tensor, q: torch.Tensor, rows: int = 16384) -> torch.Tensor:
    """``W·Q`` a slab of rows at a time (an embedding of 128k × 8192 in float64 would be 8.6 GB at once)."""
    return torch.cat([rot.rotate_in(w[i:i + rows], q) for i in range(0, w.shape[0], rows)])


@torch.no_grad()
def rotate_residual_globals(model: nn.Module, arch: Arch, seed: int) -> bool:
    """Rotate the embeddings and ``lm_head`` (the final norm folded into it; tied embeddings untied) of ``model``;
    returns False, changing nothing, where the arch table has no residual rotation. Blocks are left to
    :func:`rotate_residual_block`."""
    if arch.residual is None:
        log.info("dgq: %s has no residual-stream rotation (a norm does not commute with it); not rotated",
                 arch.family)
        return False
    q = residual_matrix(model.config, seed)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    norm = model.get_submodule(arch.residual.final_norm)
    g = (arch.norm_offset + norm.weight.detach().float()).to(head.weight.device)
    new_head = _rotate_in_rows(head.weight.detach().float() * g[None, :], q.to(head.weight.device))
    new_emb = _rotate_in_rows(emb.weight.detach(), q.to(emb.weight.device))
    head.weight = nn.Parameter(new_head.to(head.weight.dtype), requires_grad=False)
    emb.weight = nn.Parameter(new_emb, requires_grad=False)
    norm.weight.fill_(1.0 - arch.norm_offset)
    model.config.tie_word_embeddings = False
    model.dgq_residual_rotation = seed
    return True


@torch.no_grad()
def rotate_residual_block(block: nn.Module, arch: Arch, q: torch.Tensor) -> None:
    """One decoder block in the rotated residual basis: each norm's weight folded into its readers, the readers'
    input columns ``·Q``, the writers' rows (and biases) ``Qᵀ·``."""
    for spec in arch.smooth:
        if spec.kind != "norm":
            continue
        readers = [block.get_submodule(d) for d in spec.dsts]
        _fold_norm(block.get_submodule(spec.src), readers, arch.norm_offset)
        for lin in readers:
            lin.weight.copy_(rot.rotate_in(lin.weight, q))
    for name in arch.residual.writers:
        lin = block.get_submodule(name)
        lin.weight.copy_(rot.rotate_out(lin.weight, q))
        if lin.bias is not None:
            lin.bias.copy_(rot.rotate_out(lin.bias, q))
