"""Fixtures for engine tests: one tiny seeded random checkpoint, shared by the session."""
from __future__ import annotations

from pathlib import Path

import pytest

from engines.checkpoint import load_checkpoint, save_random_checkpoint
from engines.model import LlamaForCausalLM
from engines.tokenizer import ByteTokenizer
from tests.engines.tiny import PROMPT, SEED, TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_random_checkpoint(tmp_path_factory.mktemp("tiny-llama"), TINY_CONFIG, seed=SEED)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint) -> LlamaForCausalLM:
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture
def prompt_ids() -> list[int]:
    return ByteTokenizer().encode(PROMPT)
