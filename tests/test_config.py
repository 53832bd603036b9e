"""Every shipped YAML loads against its schema; a wrong key fails naming the key and the file."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_modules import STAGE_KINDS
from speechllm.config import ConfigError, StageConfig, load_pipeline, load_stage_config, stage_layers

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted((REPO / "configs" / "pipeline").glob("*.yaml"))
FRAGMENTS = sorted(p for d in ("model", "stage", "data") for p in (REPO / "configs" / d).glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_and_each_stage_load(path):
    pipeline = load_pipeline(path)
    assert pipeline.stages
    for stage in pipeline.stages:
        cfg = load_stage_config(stage_layers(path, pipeline, stage.name))
        assert cfg.kind in STAGE_KINDS


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fragment_loads(path):
    load_stage_config([(str(path), path)])


def test_misspelled_key_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1.0e-4\n  warmpu_steps: 10\n")
    with pytest.raises(ConfigError) as err:
        load_stage_config([(str(bad), bad)])
    assert "warmpu_steps" in str(err.value) and str(bad) in str(err.value)


def test_mistyped_value_and_override_are_rejected(tmp_path):
    bad = tmp_path / "typed.yaml"
    bad.write_text("trainer:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match="max_steps"):
        load_stage_config([(str(bad), bad)])
    with pytest.raises(ConfigError, match="command-line override.*lrr"):
        load_stage_config([], ["optim.lrr=3"])
    cfg = load_stage_config([], ["optim.lr=3e-4", "trainer.max_steps=7"])
    assert cfg.optim.lr == 3e-4 and cfg.trainer.max_steps == 7


def test_pipeline_stage_block_with_unknown_key(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("name: x\nstages:\n  - name: a\n    config:\n      kind: align\n      modle: {}\n")
    pipeline = load_pipeline(p)
    with pytest.raises(ConfigError) as err:
        load_stage_config(stage_layers(p, pipeline, "a"))
    assert "modle" in str(err.value) and str(p) in str(err.value)


def test_schema_defaults_are_tasu():
    cfg = OmegaConf.structured(StageConfig)
    assert cfg.optim.lr == 5e-5 and cfg.optim.warmup_steps == 200 and cfg.optim.schedule == "cosine"
    assert cfg.model.encoder.cps.keep_prob == 0.95 and cfg.model.encoder.cps.smoothing_max == 0.1
    assert cfg.model.encoder.cps.insert_prob == 0.0 and cfg.model.encoder.lsd_blank_threshold == 0.9
    assert cfg.model.llm.freeze and not cfg.model.llm.lora.enabled
