"""Perplexity on non-overlapping windows, the convention of GPTQ/AWQ/SmoothQuant papers.

Concatenate the text, tokenize without special tokens, keep the first ``max_tokens`` tokens, score non-overlapping
windows of ``seqlen`` tokens (a last partial window is dropped). When the tokenizer prepends BOS to a plain string,
each window starts with BOS and that position is not scored.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..data import eval_ids, windows
from ..errors import DGQError
from ..kvcache import cache_kwarg, new_cache


def _decoded_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Logits of window ``x`` [1, L]: the first half in one forward (prefill), then the second half one token at a
    time through the model's KV cache (teacher-forced decoding)."""
    cache = new_cache(model)
    name = cache_kwarg(model)
    half = x.shape[1] // 2
    out = [model(x[:, :half], **{name: cache}, use_cache=True).logits]
    for t in range(half, x.shape[1]):
        out.append(model(x[:, t:t + 1], **{name: cache}, use_cache=True).logits)
    return torch.cat(out, dim=1)


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, seqlen: int, bos_id: int | None, progress: bool = True,
                      decode: bool = False) -> dict:
    """``decode``: score the second half of each window by teacher-forced decoding through the KV cache (one token
    per forward, as ``generate`` runs) instead of one forward per window."""
    w = windows(ids, seqlen, bos_id)
    if w.shape[0] == 0:
        raise DGQError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for row in tqdm(w, desc="perplexity", disable=not progress, leave=False):
        x = row[None].to(device)
        logits = (_decoded_logits(model, x) if decode else model(x, use_cache=False).logits).float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        tgt = x[0, 1:]
        nll -= logp.gather(-1, tgt[:, None]).sum().item()
        count += tgt.numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "scored_tokens": count, "windows": int(w.shape[0])}


def perplexity(model, tokenizer, text: str, seqlen: int = 1024, max_tokens: int | None = 32768,
               progress: bool = True, decode: bool = False) -> dict:
    """``text`` is a corpus name (``lambada``, ``squad-wiki``) or a file path. Returns a dict with ``ppl``.
    ``decode``: see :func:`perplexity_of_ids`."""
    t0 = time.perf_counter()
    ids, bos = eval_ids(text, tokenizer, max_tokens)
    out = perplexity_of_ids(model, ids, seqlen, bos, progress, decode=decode)
    kv = getattr(model, "dgq_kv", None) or {"mode": "none"}
    out.update({"tokens": int(ids.numel()), "seqlen": seqlen, "text": text, "bos": bos is not None,
                "kv": kv["mode"], "scoring": "prefill + decode of the second half" if decode else "one forward",
                "elapsed_s": round(time.perf_counter() - t0, 2)})
    return out
