"""A stage directory survives an upgrade of the project, refuses a config that changes what it computes,
and is never deleted by --redo (a finished one is moved aside only with --force)."""

from __future__ import annotations

import json
import re

import pytest

import stages.runner as runner
from speechllm.config import ConfigError, load_stage_config, to_yaml
from stages.stage_dir import StageDir, config_diff, project_version


def test_a_field_added_with_its_default_changes_nothing():
    cfg = load_stage_config([], ["kind=asr", "data.sources.sp.manifest=x.jsonl"])
    older = re.sub(r"\n\s+lookup_min_prob: .*", "", to_yaml(cfg))  # written before lookup_min_prob existed
    older = older.replace("      kind: speech\n", "")  # ... and before sources had a kind
    assert "lookup_min_prob" not in older and config_diff(to_yaml(cfg), cfg) == []
    assert config_diff(older, cfg) == []
    newer = load_stage_config([], ["kind=asr", "data.sources.sp.manifest=x.jsonl", "model.projector.lookup_min_prob=0.5"])
    assert config_diff(older, newer) == ["model.projector.lookup_min_prob: (not in the run's config) -> 0.5"]


def test_a_field_the_project_removed_is_ignored_and_a_changed_value_is_named():
    cfg = load_stage_config([], ["kind=align"])
    older = to_yaml(cfg).replace("optim:\n", "optim:\n  rounds: 3\n")
    assert config_diff(older, cfg) == []
    changed = load_stage_config([], ["kind=align", "optim.lr=0.5", "trainer.num_threads=1"])
    assert config_diff(older, changed) == ["optim.lr: 5e-05 -> 0.5"]  # threads do not change the computation


def test_sections_the_stage_kind_does_not_read_are_not_compared(finished_stage, tmp_path):
    pipeline, stage_dir, trained = finished_stage  # an `align` stage: it reads neither distill nor selection
    run(pipeline, tmp_path, "selection.gamma=0", "distill.alpha=0.5")
    assert trained == []  # DONE, skipped: nothing it computes changed
    with pytest.raises(ConfigError, match=r"distill.alpha: 1.0 -> 0.5"):  # measures build rows with distill
        run(pipeline, tmp_path, "distill.alpha=0.5", "measures.sets.d=docs.jsonl")
    cfg = load_stage_config([], ["kind=select"])
    other = load_stage_config([], ["kind=select", "selection.gamma=0", "distill.alpha=0.5"])
    assert config_diff(to_yaml(cfg), other, ("selection",)) == ["distill.alpha: 1.0 -> 0.5"]


@pytest.fixture
def finished_stage(tmp_path, repo, monkeypatch):
    """The tiny pipeline's `align` stage as a run directory, DONE, without training anything; any attempt
    to train is recorded instead."""
    pipeline = repo / "configs" / "pipeline" / "tiny.yaml"
    (name, stage_dir, cfg), *_ = runner.resolve_stage_configs(pipeline, [], str(tmp_path / "runs"))
    stage_dir.root.mkdir(parents=True)
    stage_dir.write_config(cfg)
    (stage_dir.root / "checkpoints").mkdir()
    stage_dir.last_ckpt.write_bytes(b"weights")
    stage_dir.metrics.write_text(json.dumps({"test/noise/wer": 0.5}))
    stage_dir.done.write_text("done\n")
    trained = []
    monkeypatch.setattr(runner, "run_stage", lambda cfg, d: trained.append(d.root) or {"trained": True})
    return pipeline, stage_dir, trained


def run(pipeline, tmp_path, *overrides, **kw):
    return runner.run_pipeline(pipeline, list(overrides), only=["align"], run_dir=str(tmp_path / "runs"), **kw)


def test_the_config_records_the_project_version(finished_stage):
    _, stage_dir, _ = finished_stage
    assert stage_dir.config.read_text().startswith(f"# written by speechllm-cheap {project_version()} ")
    assert project_version() != "unknown"


def test_a_run_written_by_an_older_schema_resumes(finished_stage, tmp_path):
    pipeline, stage_dir, trained = finished_stage
    stage_dir.done.unlink()  # stopped mid-run
    old = re.sub(r"\n\s+wer_normalizer: .*", "", stage_dir.config.read_text())
    stage_dir.config.write_text(old)
    run(pipeline, tmp_path)
    assert trained == [stage_dir.root]  # resumed (run_stage picks up last.ckpt), not refused


def test_a_changed_config_is_refused_naming_old_and_new(finished_stage, tmp_path):
    pipeline, stage_dir, trained = finished_stage
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.5[\s\S]*--redo --force"):
        run(pipeline, tmp_path, "optim.lr=0.5")
    assert trained == [] and stage_dir.done.is_file()


def test_redo_of_a_finished_stage_needs_force_and_keeps_it(finished_stage, tmp_path):
    pipeline, stage_dir, trained = finished_stage
    with pytest.raises(ConfigError, match="--force"):
        run(pipeline, tmp_path, "optim.lr=0.5", redo=True)
    with pytest.raises(ConfigError, match="--force"):
        run(pipeline, tmp_path, redo=True)
    assert stage_dir.done.is_file() and trained == []
    run(pipeline, tmp_path, "optim.lr=0.5", redo=True, force=True)
    moved = [p for p in stage_dir.root.parent.iterdir() if p.name.startswith("align.replaced-")]
    assert len(moved) == 1 and (moved[0] / "DONE").is_file() and (moved[0] / "checkpoints" / "last.ckpt").read_bytes() == b"weights"
    assert trained == [stage_dir.root] and "optim.lr=0.5" not in str(moved)
    assert "lr: 0.5" in StageDir(stage_dir.root).config.read_text()


def test_redo_of_an_unfinished_stage_moves_it_aside(finished_stage, tmp_path):
    pipeline, stage_dir, trained = finished_stage
    stage_dir.done.unlink()
    run(pipeline, tmp_path, "optim.lr=0.5", redo=True)
    moved = [p for p in stage_dir.root.parent.iterdir() if p.name.startswith("align.replaced-")]
    assert len(moved) == 1 and (moved[0] / "checkpoints" / "last.ckpt").is_file() and trained == [stage_dir.root]
