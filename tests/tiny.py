"""Tiny randomly initialised models of every supported family (GQA where the family has it)."""

import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


def tiny_config(family: str):
    import transformers as T

    if family == "llama":
        return T.LlamaConfig(**COMMON, tie_word_embeddings=False)
    if family == "mistral":
        return T.MistralConfig(**COMMON, sliding_window=None)
    if family == "qwen2":
        return T.Qwen2Config(**COMMON, tie_word_embeddings=True)
    if family == "qwen3":
        return T.Qwen3Config(**COMMON, head_dim=16)
    if family == "gemma":
        return T.GemmaConfig(**COMMON, head_dim=16)
    if family == "gemma2":
        return T.Gemma2Config(**COMMON, head_dim=16, sliding_window=32)
    if family == "gemma3":
        return T.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=32)
    if family == "phi3":
        return T.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                           max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=1)
    raise KeyError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "opt")


def make_tiny(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    with torch.no_grad():  # give norms non-trivial weights so folding/offset bugs would show
        for n, p in model.named_parameters():
            if "norm" in n and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
