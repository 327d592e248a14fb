"""dgq checkpoints as GGUF files (what llama.cpp and Ollama run): ``gguf-q4_1`` and ``gguf-q8_0``.

A GGUF carries the model's metadata (architecture, hyper-parameters, tokenizer) besides its tensors, which a dgq
checkpoint does not hold: the export needs **the GGUF the model came from** (the source GGUF). Its key/value pairs
are copied as they are (``general.file_type`` becomes the target's), and so are its tensors that dgq did not
quantize (embeddings, norms, ``output``, unquantized linears) — byte for byte, in their own GGUF type, when the
checkpoint holds the same values; as float32 from the checkpoint when quantization changed them (smoothing folds
scales into norms). The source GGUF is ``source_gguf`` (``--source-gguf PATH``, or an alias name); without it, a
checkpoint of an alias (``dgq quantize smollm2-135m``: its config.json keeps the GGUF's ``general.name`` as
``_model_name_or_path``) finds its alias's GGUF; a checkpoint of a Hugging Face folder has no source GGUF and is
refused (one line saying one is needed). The source is checked against the checkpoint before anything is written:
same architecture, sizes and tensor shapes, and the same token embeddings (else it is another model).

Every quantized linear becomes one GGUF tensor of blocks of 32 weights along K (``blk.N.attn_q.weight`` ...); the
blocks are written from dgq's own codes, never re-quantized from floats:

``gguf-q4_1`` — 20-byte blocks ``d`` (fp16), ``m`` (fp16), 16 bytes of codes (byte ``j``: code ``j`` in the low
    nibble, code ``j + 16`` in the high one); llama.cpp computes ``w = d·q + m``. DGQ modules give ``d = s_ch·s_int``
    (the product in float32, rounded to float16) and ``m = −d·z`` (float16 ``d`` times ``z``, rounded to float16),
    codes ``q`` as they are; the group size must be a multiple of 32 (each 32-block lies in one group). W4A16
    (GPTQ/AWQ/RTN) modules give ``d = scale`` (float16 already: exact) and ``m = −scale·z`` rounded to float16.
    Per weight, ``|w − w_dgq| ≤ |q − z|·δ(d) + δ(m)`` with ``δ(v) ≤ 2⁻¹¹·|v|`` for float16 normals (``2⁻²⁵``
    absolute for subnormals), i.e. at most ``2⁻¹¹·d·(|q − z| + z)`` plus float32 rounding. 8-bit weights (W8A8) are
    refused: export them with ``gguf-q8_0``.
``gguf-q8_0`` — 34-byte blocks ``d`` (fp16), 32 int8 ``qs``; ``w = d·qs``. DGQ modules give the exact int8 weight
    ``qs = s_int·(q − z)`` and ``d = s_ch`` rounded to float16 (relative error ≤ 2⁻¹¹ per weight; any group size);
    W8A8 modules give their int8 weight and ``d = scale`` the same way; W4A16 modules with groups a multiple of 32
    give ``qs = q − z`` and ``d = scale``: exact.

Activations are float in llama.cpp: DGQ's int8 activations (and an int8 KV cache) are not carried. For
llama-architecture GGUFs, llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` (rotary pairs
interleaved per head) and transformers' GGUF loader undoes it: the export re-applies it (to rows of blocks; Qwen2
has none). Supported source architectures: ``llama`` and ``qwen2``. ``out`` is a ``.gguf`` file, or a folder that
gets ``model.gguf``; either is written under a temporary name and renamed when complete, and ``force`` replaces
only an earlier dgq GGUF export.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from .._version import __version__
from ..errors import DGQError
from ..formats.packing import unpack_uint4
from ..fsutil import (
    GGUF_EXPORT_KEY,
    _config,
    _pid_alive,
    _umask,
    atomic_folder,
    check_output_dir,
    check_writable_dir,
    is_dgq_gguf,
)
from ..models import ALIASES, alias_gguf, cache_dir, check_gguf_header
from ..quant import rotate as rot
from . import ct

log = logging.getLogger("dgq")

Q = gguf.GGMLQuantizationType
TARGETS = ("gguf-q8_0", "gguf-q4_1")
QTYPE = {"gguf-q8_0": Q.Q8_0, "gguf-q4_1": Q.Q4_1}
FILE_TYPE = {"gguf-q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "gguf-q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
BLOCK = 32  # weights per Q4_1 / Q8_0 block
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}  # model_type -> GGUF architecture
PERMUTED = {"llama"}  # architectures whose attn_q / attn_k rows llama.cpp's converter permutes
GGUF_FILE = "model.gguf"  # the file inside a folder output
SCALE_TENSORS = {"dgq": ("channel_scale", "scales", "zeros"), "w4a16": ("scales", "zeros"), "w8a8": ("channel_scale",)}


# -- llama.cpp's q/k row permutation ----------------------------------------------------------------------------
def permute_rows(x, n_head: int):
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py): Hugging Face rows ``[head, 2, dim/2]`` -> GGUF rows
    ``[head, dim/2, 2]`` (works on weights, biases and rows of blocks; torch or numpy)."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def unpermute_rows(x, n_head: int):
    """The inverse of :func:`permute_rows` (transformers' ``_reverse_permute_weights``)."""
    return x.reshape(n_head, x.shape[0] // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# -- blocks -----------------------------------------------------------------------------------------------------
def q4_1_blocks(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_1 bytes ``[N, K/32·20]`` of codes ``[N, K]`` (0..15) and per-block float16 ``d``, ``m`` ``[N, K/32]``."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // BLOCK, BLOCK)
    qs = c[..., :16] | (c[..., 16:] << 4)
    parts = (d.to(torch.float16).contiguous().view(torch.uint8).reshape(n, -1, 2),
             m.to(torch.float16).contiguous().view(torch.uint8).reshape(n, -1, 2), qs)
    return torch.cat(parts, dim=-1).reshape(n, -1)


def q8_0_blocks(qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q8_0 bytes ``[N, K/32·34]`` of int8 weights ``[N, K]`` and per-block float16 ``d`` ``[N, K/32]``."""
    n, k = qs.shape
    parts = (d.to(torch.float16).contiguous().view(torch.uint8).reshape(n, -1, 2),
             qs.to(torch.int8).contiguous().view(torch.uint8).reshape(n, k // BLOCK, BLOCK))
    return torch.cat(parts, dim=-1).reshape(n, -1)


def block_scales(kind: str, t: dict, to: str, n: int, k: int, g: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-32-block float16 ``d`` (and ``m`` for Q4_1) ``[N, K/32]`` of a module's scale tensors ``t``."""
    nb = k // BLOCK
    if to == "gguf-q8_0":
        if kind in ("dgq", "w8a8"):
            return t["channel_scale"].float()[:, None].expand(n, nb).to(torch.float16), None
        return t["scales"].repeat_interleave(g // BLOCK, dim=1).to(torch.float16), None
    d = (t["channel_scale"].float()[:, None] * t["scales"].float()) if kind == "dgq" else t["scales"].float()
    d16 = d.to(torch.float16)
    m16 = (-(d16.float() * t["zeros"].float())).to(torch.float16)
    return d16.repeat_interleave(g // BLOCK, dim=1), m16.repeat_interleave(g // BLOCK, dim=1)


def module_blocks(src: ct.Source, name: str, kind: str, spec: dict, to: str) -> torch.Tensor:
    """One quantized module as the target's block bytes ``[N, bytes per row]`` (Hugging Face row order)."""
    w, _ = ct._container(src, name, kind, spec)
    n, k = w.shape
    g = w.group_size
    if kind == "dgq":
        t = {"channel_scale": w.channel_scale, "scales": w.scales, "zeros": w.zeros}
    elif kind == "w8a8":
        t = {"channel_scale": w.scale}
    else:
        t = {"scales": w.scales, "zeros": w.zeros}
    d, m = block_scales(kind, t, to, n, k, g)
    if to == "gguf-q4_1":
        return q4_1_blocks(unpack_uint4(w.qweight), d, m)
    if kind == "w4a16":
        q = unpack_uint4(w.qweight).to(torch.int16).view(n, k // g, g) - w.zeros.to(torch.int16)[..., None]
        return q8_0_blocks(q.view(n, k), d)
    return q8_0_blocks(w.int8(), d)


# -- the source GGUF ----------------------------------------------------------------------------------------------
def find_source_gguf(src: ct.Source, source_gguf=None) -> Path:
    """``source_gguf`` (a path or an alias), else the GGUF of the alias the checkpoint came from (see the module
    docstring), else a one-line error saying a source GGUF is needed."""
    if source_gguf is not None and str(source_gguf).strip():
        s = str(source_gguf)
        if s in ALIASES:
            return alias_gguf(s)
        p = Path(s).expanduser()
        if not p.is_file():
            raise DGQError(f"source GGUF not found: {s} (give a .gguf file or one of the aliases: "
                           f"{', '.join(ALIASES)})")
        check_gguf_header(p)
        return p
    name = src.cfg.get("_model_name_or_path")
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    for alias in ALIASES:
        c = _config(cache_dir() / "models" / alias)
        if name and c.get("_model_name_or_path") == name and all(c.get(k) == src.cfg.get(k) for k in keys):
            return alias_gguf(alias)
    raise DGQError(f"{src.path}: a GGUF export needs the GGUF the model came from (for its metadata and tokenizer) "
                   f"and this checkpoint records none (a model from a Hugging Face folder has none): pass "
                   f"--source-gguf PATH")


def _read_gguf(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader fails with struct.error, ValueError, ... on bad files
        raise DGQError(f"cannot read the source GGUF {path} (truncated or corrupt?): {type(e).__name__}") from None


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _shape(t) -> tuple[int, ...]:
    """A reader tensor's logical shape, outermost first (as torch's)."""
    return tuple(int(x) for x in reversed(t.shape.tolist()))


def _dequantized(t) -> torch.Tensor:
    """A source tensor in float32 as gguf dequantizes it (GGUF row order)."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(
        _shape(t))


# -- the plan: refuse before writing ----------------------------------------------------------------------------
def plan(src: ct.Source, to: str, reader: gguf.GGUFReader, gpath: Path) -> dict:
    """Check the checkpoint against the target and the source GGUF; return the tensors to write, in the source's
    order: GGUF name -> ``("quant", module)``, ``("raw", None)`` (copied) or ``("f32", hf name)``."""
    p = ct.plan(src, to)
    cfg = src.config
    mtype = src.cfg.get("model_type")
    if mtype not in ARCHS:
        raise DGQError(f"{src.path}: GGUF export supports {', '.join(ARCHS)} models, not {mtype!r}")
    arch = gguf.MODEL_ARCH_NAMES[ARCHS[mtype]]
    if _field(reader, "general.architecture") != arch:
        raise DGQError(f"source GGUF {gpath} is a {_field(reader, 'general.architecture')!r} model, the checkpoint "
                       f"a {arch!r} one; not the model it was quantized from")
    for key, want in (("block_count", cfg.num_hidden_layers), ("embedding_length", cfg.hidden_size),
                      ("attention.head_count", cfg.num_attention_heads),
                      ("attention.head_count_kv", cfg.num_key_value_heads)):
        got = _field(reader, f"{arch}.{key}")
        if got is not None and int(got) != int(want):
            raise DGQError(f"source GGUF {gpath} has {arch}.{key} = {got}, the checkpoint {want}; not the model it "
                           f"was quantized from")
    tmap = gguf.TensorNameMap(ARCHS[mtype], cfg.num_hidden_layers)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads} if arch in PERMUTED else {}
    tensors = {t.name: t for t in reader.tensors}

    def gguf_name(hf: str) -> str:
        g = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None or g not in tensors:
            raise DGQError(f"{src.path}: tensor {hf} has no counterpart in the source GGUF {gpath}"
                           + (f" (expected {g})" if g else ""))
        return g

    mods, kinds = src.q["modules"], p["kinds"]
    todo, new = {}, {}
    rotation = (src.q.get("calibration") or {}).get("residual_rotation")
    untied = not src.cfg.get("tie_word_embeddings", False)
    for mod in sorted(mods):
        spec, kind = mods[mod], kinds[mod]
        n, k, g = spec["out_features"], spec["in_features"], spec.get("group_size")
        if to == "gguf-q4_1" and kind == "w8a8":
            raise DGQError(f"{src.path}: module {mod} has 8-bit weights (w8a8); gguf-q4_1 holds 4-bit weights only: "
                           f"export it with --to gguf-q8_0")
        if k % BLOCK:
            raise DGQError(f"{src.path}: module {mod} has {k} inputs, not a multiple of the GGUF block size {BLOCK}")
        if kind != "w8a8" and (g is None or g % BLOCK) and (to == "gguf-q4_1" or kind == "w4a16"):
            raise DGQError(f"{src.path}: module {mod} has group size {g}, not a multiple of {BLOCK}; {to} needs one "
                           f"scale per block of {BLOCK}" + (": export it with --to gguf-q8_0" if kind == "dgq" else ""))
        name = gguf_name(f"{mod}.weight")
        if _shape(tensors[name]) != (n, k):
            raise DGQError(f"{src.path}: {mod} is {(n, k)}, the source GGUF's {name} {_shape(tensors[name])}; not "
                           f"the model it was quantized from")
        _check_scales(src, mod, kind, spec, to)
        todo[name] = ("quant", mod)
    for hf in sorted(src.names):
        if hf in p["owned"] or hf not in p["persistent"]:
            continue
        out_name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if hf == "lm_head.weight" and untied and out_name not in tensors:  # untied by rotate_residual
            new[out_name] = ("new", hf)
            continue
        name = gguf_name(hf)
        value, t = src.get(hf), tensors[name]
        if tuple(value.shape) != _shape(t):
            raise DGQError(f"{src.path}: {hf} is {tuple(value.shape)}, the source GGUF's {name} {_shape(t)}; not the "
                           f"model it was quantized from")
        part = name.split(".")[-2] if name.startswith("blk.") else ""
        if part in heads:
            value = permute_rows(value, heads[part])
        same = value.is_floating_point() and torch.equal(_dequantized(t).to(value.dtype), value)
        if not same and name == "token_embd.weight" and not (rotation and _rotated_from(t, value, rotation)):
            raise DGQError(f"source GGUF {gpath}: its token embeddings differ from the checkpoint's; not the model it "
                           f"was quantized from")
        todo[name] = ("raw", None) if same else ("f32", hf)
    return {"todo": {**{t: todo.get(t, ("raw", None)) for t in tensors}, **new}, "heads": heads, "arch": arch, **p}


def _rotated_from(t, value: torch.Tensor, rotation: dict) -> bool:
    """Whether ``value`` is the source tensor ``t`` times the residual rotation (``rotate_residual``) the checkpoint
    records, to float32 rounding."""
    want = rot.rotate_in(_dequantized(t).double(), rot.orthogonal_matrix(value.shape[1], rotation["seed"]))
    return torch.allclose(value.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def _check_scales(src: ct.Source, mod: str, kind: str, spec: dict, to: str) -> None:
    """The float16 block scales are finite, and ``d`` is not zero where dgq's scale is not (fp16 underflow)."""
    t = {k: src.get(f"{mod}.{k}") for k in SCALE_TENSORS[kind] if f"{mod}.{k}" in src.names}
    if len(t) < len(SCALE_TENSORS[kind]):
        return  # missing tensors: refused by name when the module is read
    n, k = spec["out_features"], spec["in_features"]
    g = k if kind == "w8a8" else spec["group_size"]
    d, m = block_scales(kind, t, to, n, k, g)
    for what, v in (("d", d), ("m", m)):
        if v is not None and not bool(torch.isfinite(v).all()):
            raise DGQError(f"{src.path}: {mod}: a block scale {what} overflows float16 ({to} stores it in float16)")
    if bool((d == 0).any()):
        raise DGQError(f"{src.path}: {mod}: a block scale d underflows float16 to 0 ({to} stores it in float16)")


# -- output ------------------------------------------------------------------------------------------------------
def check_output(out, force: bool) -> tuple[Path, bool]:
    """``(path, is_file)``: a ``.gguf`` file, or a folder (as :func:`dgq.fsutil.check_output_dir` checks it)."""
    if out is None or not str(out).strip():
        raise DGQError("output name is empty")
    p = Path(out).expanduser()
    if p.suffix.lower() != ".gguf":
        return check_output_dir(out, force), False
    if p.is_dir():
        raise DGQError(f"output {p} is a folder; give a new .gguf file name or a folder name without .gguf")
    if p.exists() or p.is_symlink():
        if not force:
            raise DGQError(f"output {p} already exists; choose another name or pass --force")
        if not is_dgq_gguf(p):
            raise DGQError(f"output {p} exists and is not a GGUF dgq export wrote; --force only replaces dgq exports")
    check_writable_dir(p.parent, "output")
    return p, True


def _write_file(target: Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``target``, renamed onto it when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    for f in target.parent.glob(f"{prefix}*"):  # left by a killed earlier run
        pid = f.name[len(prefix):].split("-")[0]
        if pid.isdigit() and f.is_file() and not _pid_alive(int(pid)):
            f.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _copy_kv(writer: gguf.GGUFWriter, reader: gguf.GGUFReader, gpath: Path) -> None:
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = None
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(f.types) != 2:
                raise DGQError(f"source GGUF {gpath}: key {key} is a nested array, which the export cannot copy")
            sub = f.types[1]
        if key == "general.alignment":
            writer.data_alignment = int(f.contents())
        writer.add_key_value(key, f.contents(), vtype, sub)


def write_gguf(path: Path, src: ct.Source, reader: gguf.GGUFReader, gpath: Path, to: str, p: dict) -> None:
    tensors = {t.name: t for t in reader.tensors}
    writer = gguf.GGUFWriter(path, p["arch"])
    _copy_kv(writer, reader, gpath)
    writer.add_uint32("general.file_type", int(FILE_TYPE[to]))
    writer.add_string(GGUF_EXPORT_KEY, json.dumps({"target": to, "source": src.path.name, "dgq_version": __version__,
                                                   **{k: src.q.get(k) for k in ("method", "format", "group_size")}},
                                                  sort_keys=True))
    mods = src.q["modules"]

    def heads_of(name):
        part = name.split(".")[-2] if name.startswith("blk.") else ""
        return p["heads"].get(part)

    def data(name):
        how, ref = p["todo"][name]
        h = heads_of(name)
        if how == "raw":
            return tensors[name].data, tensors[name].tensor_type
        if how in ("f32", "new"):
            v = src.get(ref).float()
            return (permute_rows(v, h) if h else v).contiguous().numpy(), Q.F32
        b = module_blocks(src, ref, p["kinds"][ref], mods[ref], to)
        return (permute_rows(b, h) if h else b).contiguous().numpy(), QTYPE[to]

    for name, (how, ref) in p["todo"].items():  # sizes first: the header precedes the data
        t = tensors.get(name)
        if how == "new":  # a tensor the source has not (an untied lm_head), from the checkpoint
            shape = tuple(src.get(ref).shape)
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)), raw_dtype=Q.F32)
        elif how == "raw":
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
        elif how == "f32":
            shape = _shape(t)
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)), raw_dtype=Q.F32)
        else:
            n, k = _shape(t)
            nbytes = gguf.quants.quant_shape_to_byte_shape((n, k), QTYPE[to])[1]
            writer.add_tensor_info(name, (n, nbytes), np.dtype(np.uint8), n * nbytes, raw_dtype=QTYPE[to])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name in p["todo"]:  # one tensor in memory at a time
        arr, _ = data(name)
        writer.write_tensor_data(arr)
    writer.close()


# -- the export ---------------------------------------------------------------------------------------------------
def export(ckpt, to: str, out, force: bool = False, verify: bool = True, max_shard_size=None,
           source_gguf=None) -> Path:
    """Write the dgq checkpoint ``ckpt`` as a GGUF file (see the module docstring): ``out`` is a ``.gguf`` file or
    a folder that gets ``model.gguf``; returns the file's path. ``source_gguf``: the GGUF the model came from (a
    path or an alias; default: the checkpoint's alias, if it is one) — a checkpoint of a Hugging Face model has
    none and is refused. Everything is checked before anything is written; ``max_shard_size`` is not used (one
    file)."""
    if to not in TARGETS:
        raise DGQError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")
    path = Path(ckpt).expanduser()
    if not path.is_dir():
        raise DGQError(f"checkpoint not found: {path}")
    outp, is_file = check_output(out, force)
    if outp.resolve() == path.resolve() or path.resolve() in outp.resolve().parents:
        raise DGQError(f"output {outp} is inside the checkpoint being exported; choose another place")
    src = ct.Source(path, verify)
    gpath = find_source_gguf(src, source_gguf)
    reader = _read_gguf(gpath)
    p = plan(src, to, reader, gpath)
    kv = (src.q.get("kv_cache") or {}).get("mode", "none")
    if kv != "none":
        log.warning("dgq: the %s KV cache of %s is not carried into %s (llama.cpp's own KV cache settings apply)",
                    kv, path, to)
    if is_file:
        _write_file(outp, lambda tmp: write_gguf(tmp, src, reader, gpath, to, p))
        return outp
    with atomic_folder(outp, replace=True) as tmp:
        write_gguf(tmp / GGUF_FILE, src, reader, gpath, to, p)
    return outp / GGUF_FILE
