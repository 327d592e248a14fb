"""Tiny randomly initialised models of every supported family (GQA where the family has it)."""

import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


def tiny_config(family: str, **over):
    import transformers as T

    common = {**COMMON, **over}

    if family == "llama":
        return T.LlamaConfig(**common, tie_word_embeddings=False)
    if family == "mistral":
        return T.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return T.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        return T.Qwen3Config(**common, head_dim=16)
    if family == "gemma":
        return T.GemmaConfig(**common, head_dim=16)
    if family == "gemma2":
        return T.Gemma2Config(**common, head_dim=16, sliding_window=32)
    if family == "gemma3":
        return T.Gemma3TextConfig(**common, head_dim=16, sliding_window=32)
    if family == "phi3":
        return T.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "opt":
        h, f = common["hidden_size"], common["intermediate_size"]
        return T.OPTConfig(hidden_size=h, ffn_dim=f, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                           max_position_embeddings=256, word_embed_proj_dim=h, pad_token_id=1)
    raise KeyError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "opt")


def make_tiny(family: str, seed: int = 0, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **over))
    with torch.no_grad():  # give norms non-trivial weights so folding/offset bugs would show
        for n, p in model.named_parameters():
            if "norm" in n and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokenizer():
    """A 256-word word-level tokenizer (w1..w255) for the tiny models: no files, no network."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 256)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="w1", pad_token="w2")


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode alphabet (the 256 single-byte tokens of a byte-level BPE)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


GGUF_VOCAB = 258  # the byte alphabet and two merges


def write_tiny_gguf(model, path, arch: str, qtypes=None, skip=()):
    """``model`` (vocabulary :data:`GGUF_VOCAB`) as a GGUF of architecture ``arch`` the way llama.cpp's converter
    writes it (q/k rows permuted for llama), with the metadata transformers' GGUF loader needs and a byte-level BPE
    vocabulary. Tensors are F32, or ``qtypes(gguf_name)`` (a ``gguf.GGMLQuantizationType``, or None for F32:
    quantized with gguf's own quantizer); GGUF names in ``skip`` are left out."""
    import gguf

    from dgq.export.gguf import permute_rows

    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens = [*_byte_alphabet(), "Ġt", "Ġth"]
    assert len(tokens) == cfg.vocab_size
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["Ġ t", "Ġt h"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    arch_id = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    tmap = gguf.TensorNameMap(arch_id, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if "rotary" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if g in skip:
            continue
        t = t.float()
        if arch == "llama" and ".attn_q." in g:
            t = permute_rows(t, cfg.num_attention_heads)
        if arch == "llama" and ".attn_k." in g:
            t = permute_rows(t, cfg.num_key_value_heads)
        a = t.contiguous().numpy()
        q = qtypes(g) if qtypes else None
        if q is None:
            w.add_tensor(g, a)
        elif q == gguf.GGMLQuantizationType.F16:
            w.add_tensor(g, a.astype("float16"))
        else:
            w.add_tensor(g, gguf.quants.quantize(a, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
