import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the test modules import tests/models.py as `models`

from models import save_tiny_causal_lm, write_sft_file  # noqa: E402 (needs the path above)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama with the real GPT-2 tokenizer, saved as a local model directory (one per test module)."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    """A small prompt/completion JSONL file (one per test module)."""
    return write_sft_file(tmp_path_factory.mktemp("data") / "train.jsonl")
