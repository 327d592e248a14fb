"""Cross-check of dgq.eval.tasks against lm-evaluation-harness itself (optional extra ``lm-eval``).

lm-eval's own task objects are built from its installed YAML configs (``ConfigurableTask``), fed the local Arrow
data through the config's ``custom_dataset`` hook (no network), and scored with lm-eval's ``HFLM`` wrapper on the
same in-memory model. Our requests must be the same strings, our log-likelihoods within 1e-4, and the chosen
answers (acc / acc_norm per document) identical.
"""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (optional: pip install lm-eval)")
datasets = pytest.importorskip("datasets", reason="datasets (an lm-eval dependency) is not installed")

from dgq.eval import tasks as T  # noqa: E402

LIMIT = 6  # documents per task scored by both harnesses


def lm_eval_task(name: str):
    """lm-eval's ConfigurableTask for ``name`` from its YAML, with the local validation split as its data."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / T.TASKS[name].lm_eval_yaml)
    cfg.pop("tag", None)
    folder = str(T.data_path(name))

    def local(**_):
        ds = datasets.load_from_disk(folder)
        if name == "boolq":  # google boolq (answer: bool) -> super_glue boolq's label (0 = False, 1 = True)
            ds = ds.map(lambda d: {"label": int(d["answer"])})
        return datasets.DatasetDict({"validation": ds})

    # only the validation split is shipped: no test split (ARC's default) and no few-shot training split
    cfg.update(custom_dataset=local, training_split=None, test_split=None)
    return ConfigurableTask(config=cfg)


def lm_eval_requests(task, docs):
    out = []
    for i, doc in enumerate(docs):
        ctx = task.fewshot_context(doc, 0)
        out.append(task.construct_requests(doc, ctx, metadata=(task.config.task, i, 1)))
    return out


@pytest.fixture(scope="module")
def lm_tasks():
    return {name: lm_eval_task(name) for name in T.TASKS}


@pytest.mark.parametrize("name", list(T.TASKS))
def test_every_request_string_matches_lm_eval(lm_tasks, name):
    """All validation documents: our (context, continuation) pairs and gold index equal lm-eval's."""
    task = lm_tasks[name]
    docs = list(task.eval_docs)
    ours = T.build_items(name)
    assert len(ours) == len(docs)
    for i, (doc, item, reqs) in enumerate(zip(docs, ours, lm_eval_requests(task, docs), strict=True)):
        assert item.requests == tuple(tuple(r.args) for r in reqs), (name, i)
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        assert item.gold == gold, (name, i)
        assert list(item.choices) == task.doc_to_choice(doc), (name, i)


def _crosscheck(model, tok, lm_tasks, limit, lm_batch, our_batch):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=lm_batch, device="cpu")
    for name, spec in T.TASKS.items():
        task = lm_tasks[name]
        docs = list(task.eval_docs)[:limit]
        reqs = lm_eval_requests(task, docs)
        flat = [r for rs in reqs for r in rs]
        theirs = lm.loglikelihood(flat, disable_tqdm=True)
        items = T.build_items(name, limit)
        reqs_ours = [r for it in items for r in it.requests]
        ours = T.loglikelihoods(model, tok, reqs_ours, batch_size=our_batch, progress=False)
        assert len(ours) == len(theirs)
        for (a, ga), (b, gb), r in zip(ours, theirs, flat, strict=True):
            assert a == pytest.approx(b, abs=1e-4), (name, r.args)
            assert ga == gb, (name, r.args)
        per_item = T.score_items(items, ours, spec.metrics)
        k = 0
        for doc, mine in zip(docs, per_item, strict=True):
            n = len(task.doc_to_choice(doc))
            ref = task.process_results(doc, theirs[k:k + n])
            k += n
            for m in spec.metrics:
                assert mine[m] == ref[m], (name, m, doc)


@pytest.mark.slow
def test_loglikelihoods_match_hflm_smollm2(smollm2_dir, lm_tasks):
    from dgq import load_model

    torch.set_num_threads(1)
    model, tok = load_model(str(smollm2_dir))
    _crosscheck(model, tok, lm_tasks, LIMIT, lm_batch=4, our_batch=3)  # different batching and padding


@pytest.mark.slow
def test_loglikelihoods_match_hflm_smollm2_a8w4(smollm2_dir, lm_tasks):
    """The same on the RTN A8W4 (group 64) model: DGQLinear layers under both harnesses.

    One sequence per forward on both sides: with int8 activations a last-bit change in a float GEMM (which a
    different batch / padding shape gives) can flip an activation rounding and move a request's log-likelihood by
    up to a few nats, so only identical shapes give comparable numbers (see dgq.eval.tasks)."""
    import dgq

    torch.set_num_threads(1)
    model, tok = dgq.load_model(str(smollm2_dir))
    dgq.quantize(model, dgq.DGQConfig(method="rtn", group_size=64, act="dynamic"))
    _crosscheck(model, tok, lm_tasks, 3, lm_batch=1, our_batch=1)
