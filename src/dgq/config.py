"""``DGQConfig``: what to quantize and how, as plain data. The method registry (:mod:`dgq.methods`) sits above it:
``dgq.methods.resolve(config)`` checks a config against its method and fills the defaults that depend on it."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import DGQError
from .formats import FORMATS
from .kvcache import KV_MODES


@dataclass
class DGQConfig:
    """What to quantize and how.

    method: a registered method (``dgq.methods.names()``): ``rtn`` (data-free), ``smoothquant`` (W8A8, α-smoothing
        folded into the norms), ``gptq`` (W4A16, Hessian error compensation), ``awq`` (W4A16, activation-aware
        scales and clipping), ``dgq`` (DGQ A8W4: percentile smoothing and the two-phase scale search, block by
        block) or ``dgq-gptq`` (DGQ's grid, then GPTQ picks the codes). All but ``rtn`` need ``calib``.
    format: the storage format (``dgq``, ``w4a16``, ``w8a8``); None = the method's (rtn: dgq, or w4a16 with
        ``weights_only``, or w8a8 with ``w_bits=8``).
    w_bits: weight bits; None = the format's. 8 selects W8A8 for ``rtn``.
    alpha: SmoothQuant's migration strength. act_order / damp / block_size: GPTQ's knobs (act-order uses static
        groups; None = the method's default: on for dgq-gptq, which it improves, off for gptq, as published).
        awq_grid: AWQ's α grid (and clip grid) size. token_weighted: fit GPTQ to the mean per-token relative error
        (every calibration token scaled to unit norm in the Hessian) instead of the plain squared error, which a few
        massive-activation tokens dominate; None = on for dgq-gptq (its GPTQ step), off for gptq (the published
        Hessian) and dgq (its search: 24.60 vs 24.18 ppl with it, benchmarks/README.md).
    rtn_grid: dgq-gptq also runs GPTQ on the data-free RTN grid (min/max groups, ``s_ch = max|W_row|/127``) and
        keeps per row the better of that, GPTQ on the search's grid and the search alone; None = off (it lowers
        the layers' output error but raised SmolLM2's perplexity, 23.18 vs 22.62; benchmarks/README.md).
    group_size: along K; must divide every quantized layer's input size (-1 = one group per row). None (the
        default) chooses it per model: 128 where it divides every quantized layer, else 64, else the largest size
        below 128 that does (the GPU kernel runs 64, 128 and 256), recorded in the checkpoint.
    act: ``dynamic`` (per-token absmax, default) or ``static`` (per-tensor, from calibration data).
    weights_only: keep float activations (A16W4) in the same storage format.
    s_int_rounding: how rtn rounds ``s_group / s_ch`` (``round`` as in the paper/release, or ``ceil``).
    ignore: full module names not to quantize (each must name a quantizable linear).
    smooth: True, False, ``"selective"`` (keep a fold only where it lowers the consumers' quantized output error,
        judged with data-free RTN weights) or ``"measured"`` (judged with the consumers quantized by the method itself
        and run as executed on calibration tokens); None = the method's default for the activation mode.
    search / phase2: the parts of ``dgq`` (``--no-search``, ``--phase1-only``).
    search_tokens: calibration tokens sub-sampled for the search objectives (spread over all windows).
    grid1 / grid2: grid sizes of search phases 1 and 2 (phase 2 spans 1.0 -> 0.2 as in the release); refine: finer
        phase-2 ratios tried on each side of every channel's best (2·refine more candidates), so 16 + 8 ratios cover
        the release's 80-point resolution at a third of the cost.
    rotate: a per-head orthogonal (Hadamard) rotation of the attention values, folded exactly into v_proj's rows and
        o_proj's input columns (:mod:`dgq.quant.rotate`) so that o_proj's int8 activations lose less: ``off``,
        ``on`` (every block) or ``measured`` (per block, kept only where the quantized block's calibration error
        falls; it costs making v_proj and o_proj twice and one more block pass per candidate); None = the method's
        default. Needs a calibrated method and dynamic activations.
    rotate_residual: rotate the residual stream by a fixed orthogonal matrix (hidden × hidden), exact after folding
        every norm's weight into its readers (:mod:`dgq.quant.rotate`): the int8 inputs of q/k/v and gate/up lose
        their outlier channels and the 4-bit groups mix all channels. Tied embeddings are untied (lm_head takes the
        final norm's weight). Families whose norms do not commute with it (Gemma 2/3, OPT) are left unrotated.
        None = the method's default. Needs a calibrated method.
    kv: the KV cache (:mod:`dgq.kvcache`): ``none`` (float, the default), ``int8`` (dynamic, per token and KV head)
        ``int8-static`` (one scale per layer for K and for V, from calibration; needs ``calib``) or ``int8-smooth``
        (``int8`` on keys divided by their per-channel absmax from calibration; needs ``calib``).
    """

    method: str = "rtn"
    group_size: int | None = None
    act: str = "dynamic"
    weights_only: bool = False
    s_int_rounding: str = "round"
    seed: int = 0
    ignore: tuple[str, ...] = field(default_factory=tuple)
    smooth: bool | str | None = None
    search: bool = True
    phase2: bool = True
    search_tokens: int = 4096
    grid1: int = 20
    grid2: int = 16
    refine: int = 4
    w_bits: int | None = None
    format: str | None = None
    alpha: float = 0.5
    act_order: bool | None = None
    damp: float = 0.01
    block_size: int = 128
    awq_grid: int = 20
    token_weighted: bool | None = None
    rtn_grid: bool | None = None
    kv: str = "none"
    rotate: str | None = None
    rotate_residual: bool | None = None

    def check_fields(self) -> None:
        """Field-level checks that need no method (the method's own come from ``dgq.methods.resolve``)."""
        if self.w_bits not in (None, 4, 8):
            raise DGQError(f"w_bits must be 4 or 8, got {self.w_bits}")
        if self.format not in (None, *FORMATS):
            raise DGQError(f"unknown format {self.format!r}; choose one of: {', '.join(FORMATS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise DGQError(f"smoothquant alpha must lie in [0, 1], got {self.alpha}")
        for knob in ("act_order", "token_weighted", "rtn_grid", "rotate_residual"):
            if getattr(self, knob) not in (None, True, False):
                raise DGQError(f"{knob} must be true, false or unset, got {getattr(self, knob)!r}")
        if not 0.0 < self.damp < 1.0:
            raise DGQError(f"GPTQ damp must lie in (0, 1), got {self.damp}")
        if self.block_size < 1 or self.awq_grid < 1:
            raise DGQError("block_size and awq_grid must be positive")
        if self.act not in ("dynamic", "static"):
            raise DGQError(f"unknown activation mode {self.act!r}; choose dynamic or static")
        if self.s_int_rounding not in ("round", "ceil"):
            raise DGQError(f"s_int_rounding must be round or ceil, got {self.s_int_rounding!r}")
        if self.smooth not in (None, True, False, "selective", "measured"):
            raise DGQError(f"smooth must be true, false, 'selective' or 'measured', got {self.smooth!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                                            or self.group_size == 0 or self.group_size < -1):
            raise DGQError(f"group size must be a positive integer or -1 (per-channel), got {self.group_size!r}")
        if isinstance(self.ignore, str) or not all(isinstance(n, str) for n in self.ignore):
            raise DGQError(f"ignore must be a sequence of full module names, got {self.ignore!r}")
        if self.rotate not in (None, "off", "on", "measured"):
            raise DGQError(f"rotate must be off, on or measured, got {self.rotate!r}")
        if self.rotate in ("on", "measured") and self.act == "static":
            raise DGQError("rotate needs dynamic activations: static scales would need the rotated inputs' absmax")
        if self.kv not in KV_MODES:
            raise DGQError(f"unknown KV cache mode {self.kv!r}; choose one of: {', '.join(KV_MODES)}")
        if self.search_tokens < 1 or self.grid1 < 1 or self.grid2 < 1 or self.refine < 0:
            raise DGQError("search_tokens, grid1 and grid2 must be positive and refine non-negative")

    # -- derived from a resolved config (format filled in) ----------------------------------------------------
    @property
    def layer_class(self):
        if self.format is None:
            raise DGQError("this config is not resolved (dgq.methods.resolve fills in its format)")
        return FORMATS[self.format]

    @property
    def act_mode(self) -> str:
        """``none`` (float activations) for weight-only and for formats without int8 activations, else ``act``."""
        return "none" if self.weights_only or self.layer_class.act_modes == ("none",) else self.act

    @property
    def bits(self) -> tuple[int, int]:
        """(weight bits, activation bits) as written."""
        return self.layer_class.w_bits, (16 if self.act_mode == "none" else 8)
