"""Sibling fusion: quantized linears that read the same input (q/k/v after the attention norm, gate/up after the
MLP norm: the arch table's norm -> linears mappings) run as ONE quantized GEMM.

What it saves: the input is quantized once instead of once per sibling, and one launch with ``N = sum(N_i)``
replaces several small ones. Decode is latency bound, so at batch 1 a LLaMA block makes 4 GEMM launches (and 4
activation quantizations) instead of 7; on the CPU the small k/v projections stop paying their own quantization.
No weight memory is added: once built, the siblings' buffers are row slices (views) of the fused buffers, and
checkpoints stay per module (``dgq.save`` writes each slice as its own tensor).

How: :func:`fuse_siblings` attaches a :class:`SiblingGroup` to each member. The first member called with an input
``x`` runs the fused layer on ``x`` and keeps the output; each other member called with the *same tensor object*
(not modified in place since: its version counter is compared where torch keeps one; inference-mode tensors keep
none, so there identity alone is checked) returns its column slice of that output without computing anything. Any
other call (another input, a member asked twice) computes afresh, so results never depend on call order. The
returned slices are column views of the fused ``[..., sum(N_i)]`` output (last-dim stride 1; ``.view`` that splits
the last dimension, as attention head reshapes do, works; call ``.contiguous()`` before merging leading dims).

Under ``torch.compile`` the members run one by one (``QuantLinear.forward`` skips the group while compiling): the
identity and pointer checks would split the traced graph at every member (the test asserts none), and a traced graph
keeps no Python state between calls anyway.

Outputs are bitwise equal to the unfused layers on the int8 kernels (exact int32 accumulation and an elementwise
epilogue per output); the weight-only float GEMM may differ in the last bits (BLAS blocking depends on N).
"""

from __future__ import annotations

import threading

from torch import nn

from .arch import arch_for_config, get_blocks
from .formats import QuantLinear


def _version(x) -> int | None:
    try:
        return x._version
    except RuntimeError:  # inference tensors do not track versions
        return None


def why_not_fusable(members: list) -> str | None:
    """None if ``members`` can run as one GEMM; otherwise the reason (one line)."""
    if len(members) < 2:
        return "fewer than two quantized members"
    m0 = members[0]
    if not isinstance(m0, QuantLinear):
        return f"{type(m0).__name__} is not a quantized linear"
    rows0 = m0.row_buffers()
    bufs0 = dict(m0.named_buffers(recurse=False))
    for m in members[1:]:
        if type(m) is not type(m0):
            return f"mixed formats ({type(m0).__name__}, {type(m).__name__})"
        for attr in ("in_features", "group_size", "act_mode"):
            if getattr(m, attr, None) != getattr(m0, attr, None):
                return f"different {attr} ({getattr(m0, attr, None)} vs {getattr(m, attr, None)})"
        bufs = dict(m.named_buffers(recurse=False))
        if set(bufs) != set(bufs0) or m.row_buffers() != rows0:
            return "different buffers (bias on some members only?)"
        for name, t in bufs.items():
            t0 = bufs0[name]
            if t.dtype != t0.dtype or t.device != t0.device:
                return f"{name} differs in dtype or device"
            if name not in rows0 and not (t.shape == t0.shape and bool((t == t0).all())):
                return f"{name} differs between members (e.g. static activation scales calibrated apart)"
    return None


class SiblingGroup:
    """Runs its members as one fused layer and hands each member its slice (see the module docstring)."""

    def __init__(self, members: list[QuantLinear]):
        why = why_not_fusable(members)
        if why is not None:
            raise ValueError(f"cannot fuse: {why}")
        self.members = list(members)
        self.spans = []
        lo = 0
        for m in members:
            self.spans.append((lo, lo + m.out_features))
            lo += m.out_features
        self._rows = [m.row_buffers() for m in members]  # fixed by the format and sizes
        self.fused: QuantLinear | None = None
        self._ptrs: tuple = ()
        self._gen = 0  # bumped whenever the fused layer is dropped or rebuilt: kept outputs of older ones are stale
        self.clear()
        for i, m in enumerate(members):
            m.siblings, m.sibling_index = self, i

    def clear(self) -> None:
        """Drop the kept input/output of this thread (its next call computes afresh)."""
        t = self._tls
        t.x, t.ver, t.y, t.pending, t.gen = None, None, None, set(), -1

    @property
    def _tls(self):
        """The kept input/output are per thread: two threads running one model must not read each other's."""
        tls = self.__dict__.get("_local")
        if tls is None:
            tls = self.__dict__["_local"] = threading.local()
        if not hasattr(tls, "pending"):
            tls.x, tls.ver, tls.y, tls.pending, tls.gen = None, None, None, set(), -1
        return tls

    def __getstate__(self):  # copy.deepcopy / pickle: the per-thread state is not copied
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def invalidate(self) -> None:
        """The members' tensors changed (moved, reloaded): rebuild the fused layer on the next call."""
        self.fused = None
        self._gen += 1
        self.clear()

    def _current_ptrs(self) -> tuple:
        return tuple(getattr(m, n).data_ptr() for m, rows in zip(self.members, self._rows, strict=True) for n in rows)

    def layer(self) -> QuantLinear:
        """The fused layer, (re)built when the members' tensors are not (any more) views of it."""
        if self.fused is None or self._current_ptrs() != self._ptrs:
            fused = type(self.members[0]).concat(self.members)
            for m, (lo, hi) in zip(self.members, self.spans, strict=True):
                m.use_rows_of(fused, lo, hi)
            self.fused, self._ptrs = fused, self._current_ptrs()
            self._gen += 1
            self.clear()
        return self.fused

    def __call__(self, member: QuantLinear, x):
        i = member.sibling_index
        ver = _version(x)
        t = self._tls
        if t.x is x and t.ver == ver and i in t.pending and t.gen == self._gen and self.fused is not None \
                and self._current_ptrs() == self._ptrs:
            y = t.y
            t.pending.discard(i)
            if not t.pending:
                self.clear()
        else:
            y = self.layer()(x)
            t.x, t.ver, t.y, t.gen = x, ver, y, self._gen
            t.pending = set(range(len(self.members))) - {i}
        lo, hi = self.spans[i]
        return y[..., lo:hi]


def unfuse(model: nn.Module) -> int:
    """Detach every sibling group (members keep their current tensors and run alone again); returns how many."""
    groups = {id(g): g for m in model.modules() if (g := getattr(m, "siblings", None)) is not None}
    for g in groups.values():
        for m in g.members:
            del m.siblings, m.sibling_index  # back to the class defaults (no group)
            m.kernel_cache = {}
        g.invalidate()
    return len(groups)


def fuse_siblings(model: nn.Module) -> list[tuple[list[str], str | None]]:
    """Group the quantized linears that share an input (per the arch table) so each group runs as one GEMM.

    Returns one entry per candidate group: its module names and None (fused) or why it was not fused (mixed
    formats, static activation scales calibrated apart, some members left unquantized...). Idempotent.
    """
    arch = arch_for_config(model.config)
    report = []
    for bi, block in enumerate(get_blocks(model, arch)):
        for sm in arch.smooth:
            if sm.kind != "norm" or len(sm.dsts) < 2:
                continue
            # members left unquantized (ignore list) run on their own; the rest still fuse
            dsts = [d for d in sm.dsts if isinstance(block.get_submodule(d), QuantLinear)]
            names = [f"{arch.blocks}.{bi}.{d}" for d in dsts]
            members = [block.get_submodule(d) for d in dsts]
            if any(m.siblings is not None for m in members):
                report.append((names, None) if all(m.siblings is members[0].siblings for m in members)
                              else (names, "already in another group"))
                continue
            why = why_not_fusable(members)
            if why is None:
                SiblingGroup(members)
            report.append((names, why))
    return report
