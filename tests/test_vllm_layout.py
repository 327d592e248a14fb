"""The vLLM plugin's pure logic (:mod:`dgq.vllm_plugin.layout`, no vLLM needed): which checkpoint linears a vLLM
layer runs, the tensors of each format and how tensor parallelism splits them, and the refusals. The split rule is
checked by running the shards with dgq's own kernels: column shards concatenate to the full layer's output bitwise,
row shards sum to it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgq.errors import DGQError
from dgq.formats import FORMATS
from dgq.formats.dgq import safe_code_bounds
from dgq.formats.packing import pack_uint4
from dgq.vllm_plugin import layout

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def entry(k=256, n=256, g=64, fmt="dgq", act="dynamic", bias=False):
    return {"format": fmt, "in_features": k, "out_features": n, "group_size": g, "act_mode": act, "bias": bias}


def qcfg(modules, version=2):
    return {"quant_method": "dgq", "format_version": version, "modules": modules}


def test_tensor_kinds_read_off_the_formats():
    assert layout.tensor_kinds("dgq") == {"qweight": ("packed", torch.uint8), "zeros": ("group", torch.int8),
                                          "scales": ("group", torch.int8), "channel_scale": ("channel", torch.float32),
                                          "act_scale": ("tensor", torch.float32)}
    assert layout.tensor_kinds("w8a8") == {"weight": ("full", torch.int8), "channel_scale": ("channel", torch.float32),
                                           "act_scale": ("tensor", torch.float32)}
    assert layout.tensor_kinds("w4a16") == {"qweight": ("packed", torch.uint8), "scales": ("group", torch.float16),
                                            "zeros": ("group", torch.uint8)}


def test_layer_spec_fuses_the_checkpoint_linears():
    p = "model.layers.0.self_attn"
    mods = {f"{p}.q_proj": entry(n=256), f"{p}.k_proj": entry(n=128), f"{p}.v_proj": entry(n=128),
            f"{p}.o_proj": entry()}
    s = layout.layer_spec(f"{p}.qkv_proj", mods, PACKED)
    assert s.names == (f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj") and s.out_features == (256, 128, 128)
    assert (s.format, s.group_size, s.act_mode, s.in_features) == ("dgq", 64, "dynamic", 256)
    assert layout.layer_spec(f"{p}.o_proj", mods, PACKED).names == (f"{p}.o_proj",)
    assert layout.layer_spec("model.layers.0.mlp.gate_up_proj", mods, PACKED) is None  # not quantized: float
    assert layout.layer_spec("lm_head", mods, PACKED) is None


def test_layer_spec_refuses_what_one_layer_cannot_run():
    p = "model.layers.0.self_attn"
    with pytest.raises(DGQError, match="quantizes only .*q_proj, .*k_proj; quantize all of them or none"):
        layout.layer_spec(f"{p}.qkv_proj", {f"{p}.q_proj": entry(), f"{p}.k_proj": entry()}, PACKED)
    for odd in (entry(g=128), entry(act="static"), entry(fmt="w4a16", act="none")):
        mods = {f"{p}.q_proj": entry(), f"{p}.k_proj": odd, f"{p}.v_proj": entry()}
        with pytest.raises(DGQError, match="k_proj differs from .*q_proj"):
            layout.layer_spec(f"{p}.qkv_proj", mods, PACKED)
    # per-channel W8A8 carries no meaningful group size: two W8A8 siblings fuse whatever their entries say
    mods = {f"{p}.q_proj": entry(fmt="w8a8", g=256), f"{p}.k_proj": entry(fmt="w8a8", g=7),
            f"{p}.v_proj": entry(fmt="w8a8", g=256)}
    assert layout.layer_spec(f"{p}.qkv_proj", mods, PACKED).group_size == 256


def test_check_modules_refusals():
    assert layout.check_modules(qcfg({"a": entry()})) == {"a": entry()}
    with pytest.raises(DGQError, match="newer than this plugin reads"):
        layout.check_modules(qcfg({"a": entry()}, version=3))
    with pytest.raises(DGQError, match="format 'nf4', which this dgq does not know"):
        layout.check_modules(qcfg({"a": entry(fmt="nf4")}))
    with pytest.raises(DGQError, match="not one the w4a16 format runs"):
        layout.check_modules(qcfg({"a": entry(fmt="w4a16", act="dynamic")}))
    with pytest.raises(DGQError, match="group size 48 does not divide its 256 inputs"):
        layout.check_modules(qcfg({"a": entry(g=48)}))
    with pytest.raises(DGQError, match=r"bad entry for a \(in_features=0\)"):
        layout.check_modules(qcfg({"a": entry(k=0)}))
    with pytest.raises(DGQError, match="lists no quantized modules"):
        layout.check_modules(qcfg({}))
    with pytest.raises(DGQError, match="not a dgq quantization_config"):
        layout.check_modules({"quant_method": "gptq"})


def spec(k=256, g=64, fmt="dgq", n=(256,)):
    return layout.LayerSpec(("x",), fmt, g if FORMATS[fmt].grouped else k, "dynamic", False, k, n)


def test_row_split_must_fall_on_group_boundaries():
    layout.check_partition(spec(), 256, "L")  # column parallel (or TP 1): always
    layout.check_partition(spec(), 128, "L")  # TP 2: two groups of 64 per rank
    layout.check_partition(spec(), 64, "L")  # TP 4: one group each
    with pytest.raises(DGQError, match=r"L: tensor parallel size 8 gives each rank 32 of its 256 inputs, which does "
                                       r"not fall on a group boundary \(group size 64, 4 groups\).*divides 4 "
                                       r"\(1, 2, 4\)"):
        layout.check_partition(spec(), 32, "L")
    with pytest.raises(DGQError, match="a single group per row"):
        layout.check_partition(spec(g=256), 128, "L")
    with pytest.raises(DGQError, match="odd count; 4-bit codes are packed two per byte"):
        layout.check_partition(spec(k=6, g=3, fmt="w4a16"), 3, "L")
    layout.check_partition(spec(k=6, fmt="w8a8"), 3, "L")  # per-channel int8: any even split
    with pytest.raises(DGQError, match="not an even split"):
        layout.check_partition(spec(), 100, "L")


def random_layer(fmt: str, k: int, n: int, g: int, act: str, bias: bool, seed: int):
    """A layer of this format with random valid tensors (codes in DGQ's int8-safe range)."""
    gen = torch.Generator().manual_seed(seed)
    cls = FORMATS[fmt]
    m = cls(k, n, g, bias=bias, act_mode=act)
    groups = k // m.group_size
    if fmt in ("dgq", "w4a16"):
        zeros = torch.randint(0, 16, (n, groups), generator=gen)
        codes = torch.randint(0, 16, (n, k), generator=gen)
        if fmt == "dgq":
            scales = torch.randint(1, 12, (n, groups), generator=gen)
            lo, hi = safe_code_bounds(zeros.to(torch.int8), scales.to(torch.int8))
            codes = codes.view(n, groups, -1).clamp(lo[..., None], hi[..., None]).view(n, k)
            m.scales.copy_(scales)
            m.zeros.copy_(zeros)
        else:
            m.scales.copy_(torch.rand(n, groups, generator=gen) * 0.02 + 0.001)
            m.zeros.copy_(zeros)
        m.qweight.copy_(pack_uint4(codes))
    else:
        m.weight.copy_(torch.randint(-127, 128, (n, k), generator=gen))
    if hasattr(m, "channel_scale"):
        m.channel_scale.copy_(torch.rand(n, generator=gen) * 0.01 + 0.001)
    if act == "static":
        m.act_scale.fill_(0.05)
    if bias:
        m.bias.copy_(torch.randn(n, generator=gen))
    m.check("random layer")
    return m


def rank_layer(full, kinds: dict, rank: int, tp: int, parallel: str, bias: bool):
    """The layer rank ``rank`` holds: each tensor cut by :func:`layout.shard`, shapes by :func:`partition_shapes`."""
    k = full.in_features // tp if parallel == "row" else full.in_features
    n = full.out_features // tp if parallel == "column" else full.out_features
    s = layout.LayerSpec(("x",), full.format, full.group_size, full.act_mode, bias, full.in_features, (n,))
    shapes = layout.partition_shapes(s, k, n)
    m = type(full)(k, n, full.group_size if full.grouped else k, bias=bias, act_mode=full.act_mode)
    for name, (kind, _) in kinds.items():
        t = layout.shard(getattr(full, name), kind, rank, tp, parallel)
        if kind == "tensor":
            t = t.reshape(())
        else:
            assert tuple(t.shape) == shapes[name], (name, t.shape, shapes[name])
        getattr(m, name).copy_(t)
    if bias:  # column: each rank its outputs' bias; row: vLLM adds the bias on rank 0 only
        b = layout.shard(full.bias, "channel", rank, tp, parallel) if parallel == "column" else full.bias
        m.bias.copy_(b if parallel == "column" or rank == 0 else torch.zeros_like(b))
    m.check(f"rank {rank}")
    return m


CASES = [("dgq", "dynamic"), ("dgq", "static"), ("w8a8", "dynamic"), ("w8a8", "static"), ("w4a16", "none")]


@pytest.mark.parametrize("fmt,act", CASES)
@pytest.mark.parametrize("tp", [2, 4])
def test_column_shards_concatenate_to_the_layer(fmt, act, tp):
    full = random_layer(fmt, 256, 128, 64, act, bias=True, seed=tp)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)) * 2
    kinds = layout.tensor_kinds(fmt)
    parts = [rank_layer(full, kinds, r, tp, "column", True)(x) for r in range(tp)]
    assert torch.equal(torch.cat(parts, -1), full(x))  # the rows are independent: bitwise


@pytest.mark.parametrize("fmt,act", CASES)
@pytest.mark.parametrize("tp", [2, 4])
def test_row_shards_sum_to_the_layer(fmt, act, tp):
    full = random_layer(fmt, 256, 128, 64, act, bias=True, seed=10 + tp)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2)) * 2
    x[:, 7] = 40  # an outlier channel on rank 0: per-rank dynamic scales then differ from the row's
    kinds = layout.tensor_kinds(fmt)
    xs = x.view(5, tp, -1)
    y = sum(rank_layer(full, kinds, r, tp, "row", True)(xs[:, r].contiguous()) for r in range(tp))
    ref = full(x)
    if act == "dynamic":
        # each rank quantizes its slice of a token with the slice's own absmax (no cross-rank max): not the one-scale
        # layer's numbers, but finer scales, so at least as close to the float product
        exact = x @ full.dequantized_weight().T + full.bias

        def rel(a):
            return ((a - exact).norm() / exact.norm()).item()

        assert not torch.equal(y, ref)
        assert rel(y) < rel(ref) < 0.05, (rel(y), rel(ref))
    else:  # static scale or float activations: the same products, summed in another order
        assert ((y - ref).norm() / ref.norm()).item() < 1e-5


def test_plugin_imports_no_algorithm():
    """The plugin is runtime: neither its modules nor what they import load dgq.methods or dgq.quant."""
    src = Path(layout.__file__).parent
    for f in src.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dgq")):
                parts = (node.module or "").split(".")  # dgq's own modules, relative or absolute
                assert not {"methods", "quant", "calib", "api"} & set(parts), (f.name, node.module)
    code = ("import sys, dgq.vllm_plugin, dgq.vllm_plugin.layout, dgq.kernels, dgq.checkpoint; "
            "bad = [m for m in sys.modules if m.split('.')[:2] in (['dgq', 'methods'], ['dgq', 'quant'], "
            "['dgq', 'calib'], ['dgq', 'api'])]; print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]


def test_lazy_package_keeps_its_names():
    """``import dgq`` loads the algorithms on first use; ``dgq.export`` stays the function after its subpackage
    is imported."""
    code = ("import sys, dgq; assert 'dgq.methods' not in sys.modules; from dgq.export.ct import pack_int4_codes; "
            "assert callable(dgq.export) and dgq.export.__module__ == 'dgq.export', dgq.export; "
            "import dgq.export as e; assert callable(e); "
            "assert dgq.methods.names() and dgq.quantize.__module__ == 'dgq.api'; from dgq import load, DGQConfig; "
            "assert set(dgq.__all__) <= set(dir(dgq))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
