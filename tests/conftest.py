import os
import sys

# Triton kernels run under the interpreter on CPU-only machines; the mode is read when triton is first imported,
# and importing dgq imports the Triton kernel module, so it must be set before anything imports dgq.
if os.environ.get("DGQ_TEST_TRITON_NATIVE") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

os.environ.setdefault("DGQ_CACHE", os.path.expanduser("~/.cache/dgq"))

sys.path.insert(0, os.path.dirname(__file__))
from tiny import make_tiny  # noqa: E402


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M as a cached HF folder (converted from the packaged GGUF once)."""
    from dgq.models import alias_folder

    return alias_folder("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def rng():
    """A fresh generator per test run (seeded from the OS) so kernels are checked on new inputs each run."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama (SmolLM2's tokenizer and vocabulary) saved as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tiny import COMMON

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**COMMON, "vocab_size": len(smollm2_tokenizer)})
    model = AutoModelForCausalLM.from_config(cfg)
    d = tmp_path_factory.mktemp("tiny-hf") / "tiny-llama"
    model.save_pretrained(d)
    smollm2_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def report(capsys):
    """``report(text)``: print a measured number past pytest's capture (shown in the test log)."""
    def say(text):
        with capsys.disabled():
            print("\n" + text)
    return say
