"""INT8 KV cache (dgq.kvcache): exact bookkeeping, exercised in one forward as in decoding, generate / padding /
attention implementations, static scales in checkpoints, and refusals."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import dgq
from dgq import DGQConfig, DGQError, kvcache
from dgq.cli import main
from dgq.eval.perplexity import perplexity_of_ids
from tiny import make_tiny, tokenizer

CALIB = torch.randint(3, 256, (3, 24), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def test_dynamic_quantization_is_per_token_and_head_within_half_a_step():
    x = torch.randn(2, 3, 7, 16) * torch.logspace(-3, 2, 7)[None, None, :, None]
    x[0, 0, 0] = 0.0
    q, s = kvcache.quantize_dynamic(x)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 7, 1) and q.abs().max() <= 127
    back = kvcache.dequantize(q, s, torch.float32)
    assert torch.all((back - x).abs() <= s / 2 + 1e-12)
    assert torch.equal(back[0, 0, 0], torch.zeros(16))  # a zero vector stays zero (scale 1, no division by 0)
    assert torch.all(q.abs().amax(-1)[x.abs().amax(-1) > 0] == 127)  # each vector uses the full range


def test_static_quantization_clips_beyond_the_calibrated_range():
    s = torch.tensor(0.01)
    q = kvcache.quantize_static(torch.tensor([0.5, -3.0, 0.004]), s)
    assert q.tolist() == [50, -127, 0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_one_forward_equals_prefill_then_decode_and_differs_from_float(family):
    """Attention reads dequantized K/V of every position, the current one included: one forward over the window
    and prefill + token-by-token decoding through the same cache give the same logits; both differ from the float
    cache's (the quantization is exercised) by little."""
    model = make_tiny(family)
    ref = logits(model)
    kvcache.enable(model, "int8")
    one = logits(model, use_cache=False)
    cache = kvcache.new_cache(model)
    assert isinstance(cache, kvcache.Int8KVCache)
    name = kvcache.cache_kwarg(model)
    with torch.no_grad():
        parts = [model(IDS[:, :17], **{name: cache}).logits]
        for t in range(17, IDS.shape[1]):
            parts.append(model(IDS[:, t:t + 1], **{name: cache}).logits)
    dec = torch.cat(parts, 1)
    torch.testing.assert_close(one, dec, rtol=1e-4, atol=1e-5)
    err = ((one - ref).norm() / ref.norm()).item()
    assert 1e-6 < err < 0.05, err
    assert cache.get_seq_length() == IDS.shape[1]
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.int8 and layer.key_scales.shape[-2] == IDS.shape[1]
    fp = DynamicCache(config=model.config)
    kvcache.enable(model, "none")
    with torch.no_grad():
        model(IDS, **{name: fp})
    fp_bytes = sum(la.keys.nbytes + la.values.nbytes for la in fp.layers)
    # head_dim 16 in float32: 64 bytes per vector against 16 int8 + a 4-byte scale
    assert cache.nbytes() == fp_bytes * 20 // 64
    assert torch.equal(logits(model), ref)  # mode none: the hook is gone


def test_decode_scoring_equals_one_forward_scoring():
    model = make_tiny("llama")
    kvcache.enable(model, "int8")
    ids = torch.randint(3, 256, (66,), generator=torch.Generator().manual_seed(2))
    a = perplexity_of_ids(model, ids, 32, None, progress=False)
    b = perplexity_of_ids(model, ids, 32, None, progress=False, decode=True)
    assert a["scored_tokens"] == b["scored_tokens"] == 62
    assert abs(a["nll"] - b["nll"]) < 1e-5
    kvcache.enable(model, "none")
    c = perplexity_of_ids(model, ids, 32, None, progress=False)
    assert c["nll"] != a["nll"]


def test_generate_uses_the_int8_cache_and_padding_does_not_leak():
    model = make_tiny("llama")
    model.generation_config.pad_token_id = 2
    kvcache.enable(model, "int8")
    prompts = [IDS[0, :12], IDS[0, 20:27]]
    alone = []
    for p in prompts:
        out = model.generate(p[None], max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        cache = out.get("cache", out.get("past_key_values"))
        assert isinstance(cache, kvcache.Int8KVCache) and cache.get_seq_length() == p.numel() + 5
        alone.append(out.sequences[0, p.numel():])
    width = max(p.numel() for p in prompts)
    batch = torch.full((2, width), 2)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        batch[i, width - p.numel():] = p
        mask[i, width - p.numel():] = 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for i in range(2):
        assert torch.equal(out[i, width:], alone[i])


def test_eager_and_sdpa_agree_on_the_int8_cache():
    model = make_tiny("llama")
    kvcache.enable(model, "int8")
    model.set_attn_implementation("sdpa")
    a = logits(model)
    model.set_attn_implementation("eager")
    b = logits(model)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["rtn", "dgq"])
def test_static_scales_are_calibrated_saved_and_honoured(method, tmp_path):
    model = make_tiny("llama")
    cfg = DGQConfig(method=method, group_size=32, kv="int8-static", grid2=4)
    dgq.quantize(model, cfg, calib=CALIB, progress=False)
    kv = model.dgq_config["kv_cache"]
    assert kv["mode"] == "int8-static" and kv["layout"] == {"num_hidden_layers": 2, "num_key_value_heads": 2,
                                                            "head_dim": 16}
    assert len(kv["k_scale"]) == 2 and all(s > 0 for s in kv["k_scale"] + kv["v_scale"])
    before = logits(model)
    dgq.save(model, tmp_path / "q")
    back = dgq.load(tmp_path / "q")
    assert back.dgq_kv["mode"] == "int8-static" and back.dgq_kv["k_scale"] == kv["k_scale"]
    assert torch.equal(logits(back), before)
    kvcache.enable(back, "none")
    assert not torch.equal(logits(back), before)  # the scales were in use
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert hf.dgq_kv["mode"] == "int8-static"
    torch.testing.assert_close(logits(hf), before)


def test_static_scales_cover_the_calibration_absmax():
    model = make_tiny("llama")
    obs = kvcache.observe(model, CALIB)
    scales = obs.scales()
    kvcache.enable(model, "int8-static", scales)
    cache = kvcache.new_cache(model)
    with torch.no_grad():
        model(CALIB[:1], **{kvcache.cache_kwarg(model): cache})
    layer = cache.layers[1]
    assert layer.keys.abs().max() <= 127 and layer.key_scales.ndim == 0
    assert layer.key_scales.item() == pytest.approx(scales["k_scale"][1])
    # the observed absmax maps to 127 in at least one calibration window's keys
    assert max(la.k_absmax for la in obs.layers) == pytest.approx(max(scales["k_scale"]) * 127)


def test_use_kv_cache_on_a_float_model_and_dynamic_checkpoint(tmp_path):
    model = make_tiny("qwen2")
    ref = logits(model)
    dgq.use_kv_cache(model, "int8-static", CALIB)
    static = logits(model)
    dgq.use_kv_cache(model, "int8")
    dyn = logits(model)
    assert not torch.equal(static, ref) and not torch.equal(dyn, ref) and not torch.equal(static, dyn)
    with pytest.raises(DGQError, match="calibration data"):
        dgq.use_kv_cache(model, "int8-static")
    torch.testing.assert_close(logits(model), dyn, rtol=0, atol=0)  # the refusal changed nothing


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_window_models_are_refused_with_the_reason(family):
    model = make_tiny(family)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(DGQError, match="sliding_attention layers .*full-attention layers only"):
        dgq.quantize(model, DGQConfig(method="rtn", group_size=32, kv="int8"), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(DGQError, match="sliding_attention"):
        dgq.use_kv_cache(model, "int8")
    assert getattr(model, "_dgq_kv_hook", None) is None


def test_mistral_with_a_sliding_window_is_refused_and_without_one_accepted():
    from transformers import MistralConfig, MistralForCausalLM

    from tiny import COMMON

    with pytest.raises(DGQError, match="sliding_attention"):
        dgq.use_kv_cache(MistralForCausalLM(MistralConfig(**COMMON, sliding_window=16)), "int8")
    dgq.use_kv_cache(make_tiny("mistral"), "int8")


def test_bad_modes_and_static_scales_are_refused():
    model = make_tiny("llama")
    with pytest.raises(DGQError, match="unknown KV cache mode"):
        DGQConfig(kv="int4").check_fields()
    with pytest.raises(DGQError, match="one key and one value scale per layer"):
        kvcache.enable(model, "int8-static", {"k_scale": [0.1], "v_scale": [0.1]})
    with pytest.raises(DGQError, match="the int8-static KV cache needs calibration data"):
        dgq.quantize(model, DGQConfig(method="rtn", group_size=32, kv="int8-static"), progress=False)


def _reseal(path, edit):
    from dgq.checkpoint import write_config

    cfg = json.loads((path / "config.json").read_text())
    q = cfg.pop("quantization_config")
    edit(q)
    write_config(path, cfg, q, [f.name for f in path.glob("*.safetensors")])


def test_a_static_checkpoint_with_another_head_layout_is_refused(tmp_path):
    model = make_tiny("llama")
    dgq.quantize(model, DGQConfig(method="rtn", group_size=32, kv="int8-static"), calib=CALIB, progress=False)
    dgq.save(model, tmp_path / "q")
    _reseal(tmp_path / "q", lambda q: q["kv_cache"]["layout"].update(num_key_value_heads=4))
    with pytest.raises(DGQError, match="another attention layout .*num_key_value_heads 4 vs 2"):
        dgq.load(tmp_path / "q")
    with pytest.raises(DGQError, match="another attention layout"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    _reseal(tmp_path / "q", lambda q: q["kv_cache"].update(layout=kvcache.layout(model.config), k_scale=[1.0]))
    with pytest.raises(DGQError, match="k_scale must list 2 positive finite scales"):
        dgq.load(tmp_path / "q")


def test_cli_quantize_eval_and_generate_with_kv(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_hf_dir), "--out", str(out), "--method", "rtn", "--group-size", "32",
                 "--kv", "int8", "--calib", "squad-wiki", "--nsamples", "2", "--calib-seqlen", "32"]) == 0
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["kv_cache"]["mode"] == "int8" and q["recipe"]["kv"] == "int8"
    js = tmp_path / "e.json"
    assert main(["eval", str(out), "--text", "squad-wiki", "--seqlen", "32", "--max-tokens", "96",
                 "--json", str(js)]) == 0
    r8 = json.loads(js.read_text())
    assert r8["kv"] == "int8" and "KV int8" in capsys.readouterr().out
    assert main(["eval", str(out), "--text", "squad-wiki", "--seqlen", "32", "--max-tokens", "96", "--kv", "none",
                 "--json", str(js)]) == 0
    r0 = json.loads(js.read_text())
    assert r0["kv"] == "none" and r0["ppl"] != r8["ppl"]
    assert main(["eval", str(tiny_hf_dir), "--text", "squad-wiki", "--seqlen", "32", "--max-tokens", "96",
                 "--kv", "int8-static", "--nsamples", "2", "--calib-seqlen", "32", "--decode", "--json",
                 str(js)]) == 0
    rs = json.loads(js.read_text())
    assert rs["kv"] == "int8-static" and rs["scoring"].startswith("prefill")
    assert "calibrating on 2 x 32 tokens" in capsys.readouterr().out
    assert main(["generate", str(out), "hello world", "--max-new-tokens", "3", "--kv", "int8-static",
                 "--nsamples", "2", "--calib-seqlen", "32"]) == 0
    assert main(["quantize", str(tiny_hf_dir), "--out", str(tmp_path / "x"), "--kv", "int4"]) == 2


def test_zero_shot_runs_on_the_int8_cache(monkeypatch):
    """dgq eval --tasks: every scoring forward goes through the int8 cache."""
    from dgq.eval.tasks import loglikelihoods

    model, tok = make_tiny("llama"), tokenizer()
    kvcache.enable(model, "int8")
    calls = []
    orig = kvcache.Int8KVLayer.update
    monkeypatch.setattr(kvcache.Int8KVLayer, "update", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    reqs = [("w3 w4 w5", " w6"), ("w7 w8", " w9 w10")]
    res = loglikelihoods(model, tok, reqs, batch_size=2, progress=False)
    assert len(res) == 2 and len(calls) == 2  # one batched forward, two layers


def test_export_says_the_int8_cache_is_not_carried(tmp_path, caplog):
    pytest.importorskip("compressed_tensors")
    model = make_tiny("llama")
    dgq.quantize(model, DGQConfig(method="rtn", group_size=32, kv="int8"), progress=False)
    dgq.save(model, tmp_path / "q")
    with caplog.at_level("WARNING", logger="dgq"):
        dgq.export(tmp_path / "q", to="ct-w8a8", out=tmp_path / "ct")
    assert "int8 KV cache" in caplog.text and "not carried" in caplog.text
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["kv_cache_scheme"] is None


def test_a_caller_supplied_float_cache_is_used_and_warned_about(caplog):
    from transformers import StaticCache

    model = make_tiny("llama")
    kvcache.enable(model, "int8")
    ref = logits(model)
    kvcache.enable(model, "none")
    fp = logits(model)
    kvcache.enable(model, "int8")
    cache = StaticCache(config=model.config, max_cache_len=64)
    with caplog.at_level("WARNING", logger="dgq"):
        out = logits(model, **{kvcache.cache_kwarg(model): cache})
    assert "StaticCache" in caplog.text and "does not run on the model's int8 KV cache" in caplog.text
    torch.testing.assert_close(out, fp, rtol=1e-4, atol=1e-4)
    assert not torch.equal(out, ref)


def _outlier_keys(model, channel=3, size=60.0):
    """A large, token-independent key channel in every layer (what Qwen2's k_proj biases make)."""
    with torch.no_grad():
        for layer in model.model.layers:
            k = layer.self_attn.k_proj
            if k.bias is None:
                k.bias = torch.nn.Parameter(torch.zeros(k.out_features))
            k.bias[channel] = size
    return model


def test_key_smoothing_removes_the_cost_of_outlier_key_channels():
    model = _outlier_keys(make_tiny("qwen2"))
    ref = logits(model)
    errs = {}
    for mode in ("int8", "int8-smooth"):
        dgq.use_kv_cache(model, mode, CALIB)
        errs[mode] = ((logits(model) - ref).norm() / ref.norm()).item()
        dgq.use_kv_cache(model, "none")
    assert errs["int8-smooth"] < 0.7 * errs["int8"], errs  # measured 0.48x; values are not smoothed
    dgq.use_kv_cache(model, "int8-smooth", CALIB)
    f = model.dgq_kv["k_smooth"]
    assert len(f) == 2 and len(f[0]) == 2 and len(f[0][0]) == 16
    assert f[0][0][3] > 10 * sorted(f[0][0])[8]  # the outlier channel got its own factor (RoPE spreads it a little)


def test_smooth_checkpoint_round_trip_streaming_and_bad_factors(tiny_hf_dir, tmp_path):
    from dgq.stream import quantize_to

    cfg = DGQConfig(method="rtn", group_size=32, kv="int8-smooth")
    model, tok = dgq.load_model(str(tiny_hf_dir))
    dgq.quantize(model, cfg, calib=CALIB, progress=False)
    before = logits(model)
    dgq.save(model, tmp_path / "mem", tokenizer=tok)
    q = quantize_to(str(tiny_hf_dir), tmp_path / "stream", cfg, calib=CALIB, progress=False)
    assert q["kv_cache"] == model.dgq_config["kv_cache"] and set(q["kv_cache"]) == {"mode", "layout", "k_smooth"}
    back = dgq.load(tmp_path / "mem")
    assert back.dgq_kv["mode"] == "int8-smooth" and torch.equal(logits(back), before)
    kvcache.enable(back, "int8")
    assert not torch.equal(logits(back), before)
    _reseal(tmp_path / "mem", lambda q: q["kv_cache"]["k_smooth"][1][0].__setitem__(5, -1.0))
    with pytest.raises(DGQError, match="k_smooth must hold 2 x 2 x 16 positive finite factors"):
        dgq.load(tmp_path / "mem")
