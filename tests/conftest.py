"""Shared fixtures: the tiny model preset (random models from configs) and tiny synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture
def tiny_model_cfg():
    from speechllm.config import ModelConfig

    preset = OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml").model
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), preset)


@pytest.fixture(scope="session")
def tiny_model():
    from speechllm.config import ModelConfig
    from speechllm.model import SpeechLLM

    preset = OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml").model
    torch.manual_seed(0)
    return SpeechLLM.build(OmegaConf.merge(OmegaConf.structured(ModelConfig), preset))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from stages.prepare_tiny_data import prepare_tiny_data

    out = tmp_path_factory.mktemp("tiny_data")
    prepare_tiny_data(out)
    return out
