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
