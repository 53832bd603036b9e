"""Shared fixtures: the tiny model preset (random models from configs) and tiny synthetic data; and
the one rule for tests whose system package or asset is missing: outside CI they skip, saying what to
install; under ``CI=true`` they fail, so a machine without the TTS engines cannot pass green. Only
optional extras (Piper) skip everywhere, and their reason says "optional extra"."""

from __future__ import annotations

import os
import re
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


# -- missing requirements: a skip outside CI, a failure under CI=true ---------------------------------

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
OPTIONAL_ENGINES = {"piper"}  # optional extras: may skip even in CI
MISSING_PREFIX = "missing requirement: "
# Reasons the suite's other skips give for a missing package or asset (they need not use the fixture).
MISSING = re.compile(r"not installed|apt-get install|needs packages?\b", re.IGNORECASE)


def missing_requirement(reason: str) -> bool:
    """Whether a skip's reason says that a required (not optional) package or asset is missing."""
    return "optional extra" not in reason and (MISSING_PREFIX in reason or MISSING.search(reason) is not None)


def _fail_in_ci(report) -> None:
    if not (IN_CI and report.skipped and not hasattr(report, "wasxfail")):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if missing_requirement(reason):
        report.outcome = "failed"
        report.longrepr = f"CI=true: a required package or asset is missing, so this fails instead of skipping: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_in_ci(report)
    return report


@pytest.fixture(scope="session")
def tts_voice():
    """``tts_voice(spec)``: the voice, or a skip naming what to install (a failure under CI=true,
    except for an optional extra's voice)."""
    from speechllm.tts import TTSUnavailableError, get_voice

    def voice(spec: str):
        try:
            return get_voice(spec)
        except TTSUnavailableError as err:
            engine = spec.split(":", 1)[0]
            if engine in OPTIONAL_ENGINES:
                pytest.skip(f"optional extra ({engine}): {err}")
            pytest.skip(f"{MISSING_PREFIX}{err}")

    return voice
