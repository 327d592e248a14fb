"""The second real model, Qwen2.5-Coder-0.5B-Instruct (Qwen2: q/k/v biases), from its six PyPI parts."""

import pytest

import dgq
from dgq import DGQConfig
from dgq.data import tokenize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen():
    from dgq.models import alias_folder

    try:
        alias_folder("qwen2.5-coder-0.5b")
    except dgq.DGQError as e:
        pytest.skip(str(e))
    return dgq.load_model("qwen2.5-coder-0.5b")


def test_qwen_loads_runs_and_quantizes(qwen):
    model, tok = qwen
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 24
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids = tokenize(dgq.data.read_text("squad-wiki"), tok)[:512]
    fp = dgq.eval.perplexity.perplexity_of_ids(model, ids, 256, None, progress=False)["ppl"]
    assert fp < 100, fp  # a coder model on Wikipedia prose, 256-token windows: ~61; broken weights give thousands
    dgq.quantize(model, DGQConfig(method="rtn"), progress=False)  # the group size is chosen: 128 divides all
    assert model.dgq_config["group_size"] == 128
    q = dgq.eval.perplexity.perplexity_of_ids(model, ids, 256, None, progress=False)["ppl"]
    assert fp < q < 2 * fp, (fp, q)
    assert all(m.bias is not None for n, m in model.named_modules() if n.endswith("q_proj"))
