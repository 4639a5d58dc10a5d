"""Shared test fixtures. Keep them small: the whole suite runs on 2 shared CPU cores."""

import pytest
import torch

from peft_train.tokenizer import ByteTokenizer


@pytest.fixture(autouse=True, scope="session")
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def chat() -> list[dict]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
