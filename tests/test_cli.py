"""The CLI on bad input: one line on stderr, exit code 2, no traceback, nothing written."""

import json
import subprocess
import sys

import torch

from dgq.cli import main


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, pattern):
    import re

    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("dgq: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


def test_missing_model(capsys, tmp_path):
    code, _, err = run_cli(capsys, "quantize", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "model not found: .*nope.*smollm2-135m")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    d = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(d)
    code, _, err = run_cli(capsys, "quantize", d, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "unsupported architecture 'gpt2'; supported model types: .*llama")
    assert not (tmp_path / "o").exists()


def test_group_size_not_dividing(capsys, tiny_hf_dir, tmp_path):
    code, _, err = run_cli(capsys, "quantize", tiny_hf_dir, "--out", tmp_path / "o", "--group-size", "48")
    assert_one_line_error(code, err, r"group size 48 does not divide the input size 64 of "
                                     r"model\.layers\.0\.self_attn\.q_proj; sizes that divide every quantized "
                                     r"layer: 8, 16, 32, 64 \(or -1")
    assert not (tmp_path / "o").exists()


def test_nan_weights(capsys, tiny_hf_dir, smollm2_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    with torch.no_grad():
        m.model.layers[0].mlp.gate_proj.weight[0, 0] = float("nan")
    d = tmp_path / "nan-model"
    m.save_pretrained(d)
    smollm2_tokenizer.save_pretrained(d)
    code, _, err = run_cli(capsys, "quantize", d, "--out", tmp_path / "o", "--group-size", "32")
    assert_one_line_error(code, err, r"model\.layers\.0\.mlp\.gate_proj\.weight contains 1 NaN/Inf")
    assert not (tmp_path / "o").exists()


def test_quantize_eval_generate(capsys, tiny_hf_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "q"
    assert run_cli(capsys, "quantize", tiny_hf_dir, "--out", out, "--group-size", "32")[0] == 0
    code, _, err = run_cli(capsys, "quantize", tiny_hf_dir, "--out", out, "--group-size", "32")
    assert_one_line_error(code, err, "already exists")
    js = tmp_path / "new" / "r.json"  # --json creates its folder
    code, stdout, _ = run_cli(capsys, "eval", out, "--text", text, "--seqlen", "64", "--json", js)
    assert code == 0 and "ppl" in stdout
    r = json.loads(js.read_text())
    assert {"ppl", "tokens", "seqlen", "model", "elapsed_s"} <= set(r) and r["seqlen"] == 64
    assert r["quantization"]["a_bits"] == 8 and r["ppl"] > 1
    code, _, err = run_cli(capsys, "eval", out, "--text", tmp_path / "missing.txt")
    assert_one_line_error(code, err, "text not found")
    assert run_cli(capsys, "generate", out, "Hello", "--max-new-tokens", "4")[0] == 0


def test_static_needs_text_longer_than_a_window(capsys, tiny_hf_dir, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("too short")
    code, _, err = run_cli(capsys, "quantize", tiny_hf_dir, "--out", tmp_path / "o", "--group-size", "32",
                           "--act", "static", "--calib", text, "--seqlen", "64")
    assert_one_line_error(code, err, "fewer than one window")
    assert not (tmp_path / "o").exists()


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "dgq.cli", "quantize", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--group-size" in r.stdout and "--weights-only" in r.stdout


def test_default_method_is_dgq_gptq():
    """README's recommendation (both real models): `dgq quantize` without --method runs dgq-gptq."""
    from dgq.cli import build_parser

    a = build_parser().parse_args(["quantize", "m", "--out", "o"])
    assert a.method == "dgq-gptq"


def test_rotate_static_is_one_line_error(capsys, tiny_hf_dir, tmp_path):
    code, _, err = run_cli(capsys, "quantize", tiny_hf_dir, "--out", tmp_path / "o", "--group-size", "32",
                           "--act", "static", "--rotate", "measured")
    assert_one_line_error(code, err, "rotate needs dynamic activations")
    assert not (tmp_path / "o").exists()
