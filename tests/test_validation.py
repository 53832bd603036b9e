"""A misspelled choice or a broken cross-field rule stops `stages run` before any stage starts: no model
built, no data read, the key, where it was set, and what is allowed named."""

from __future__ import annotations

import subprocess
import sys

import pytest

import stages.runner as runner
from speechllm.config import ConfigError
from speechllm.model import SpeechLLM

REPO_TINY = "configs/model/tiny.yaml"


def pipeline(tmp_path, repo, stage_yaml: str, kind: str = "align") -> str:
    """A one-stage pipeline on the tiny preset; ``stage_yaml`` is the stage block (indented YAML)."""
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\ninclude: [{repo / REPO_TINY}]\ndefaults: {{data: {{train: nowhere.jsonl}}}}\n"
                    f"stages:\n  - name: s\n    config:\n      kind: {kind}\n{stage_yaml}")
    return str(path)


@pytest.fixture
def nothing_may_run(monkeypatch):
    """Building a model or running a stage fails the test: validation must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built or a stage started before the config was validated")

    monkeypatch.setattr(SpeechLLM, "build", forbidden)
    monkeypatch.setattr(runner, "run_stage", forbidden)


MISSPELLED = [  # (stage block, override, key, an allowed value the message must list)
    ("      optim: {schedule: cosin}\n", None, "optim.schedule", "wsd"),
    ("", "distill.direction=fwd", "distill.direction", "reverse"),
    ("      selection: {budget_unit: hour}\n", None, "selection.budget_unit", "fraction"),
    ("      model: {encoder: {kind: wisper}}\n", None, "model.encoder.kind", "whisper"),
    ("", "kind=algn", "kind", "distill"),
    ("      data: {sources: {a: {manifest: x.jsonl, kind: speach}}}\n", None, "data.sources.a.kind", "simulated"),
    ("      trainer: {precision: bf16}\n", "trainer.precision=bf-16", "trainer.precision", "bf16-mixed"),
]


@pytest.mark.parametrize("block,override,key,allowed", MISSPELLED, ids=[m[2] for m in MISSPELLED])
def test_a_misspelled_choice_fails_before_anything_runs(tmp_path, repo, nothing_may_run, block, override, key, allowed):
    path = pipeline(tmp_path, repo, block)
    with pytest.raises(ConfigError) as err:
        runner.run_pipeline(path, [override] if override else [], run_dir=str(tmp_path / "runs"))
    message = str(err.value)
    assert key in message and allowed in message, message
    assert ("command-line override" if override else path) in message, message
    assert not (tmp_path / "runs").exists()


RULES = [  # (stage kind, stage block, key, words of the problem)
    ("align", "      model: {encoder: {kind: whisper, from_config: {}}}\n", "data.train", "text side"),
    ("align", "      model: {encoder: {kind: whisper, from_config: {}, ctc_head: h.pt}}\n", "model.encoder.ctc_head", "read only by"),
    ("align", "      model: {encoder: {kind: whisper, from_config: {}}, projector: {unit_lookup: true}}\n",
     "model.projector.unit_lookup", "CTC encoder"),
    ("distill", "      data: {sources: {t: {manifest: t.jsonl, kind: text}}}\n", "data.sources.t.kind", "frozen LLM"),
    ("align", "      data: {sources: {t: {manifest: t.jsonl, kind: speech}}}\n", "data.sources.t.kind", "trains on"),
    ("asr", "      model: {encoder: {text_side: matched}}\n", "model.encoder.cps.stats", "posterior-stats"),
    ("asr", "      model: {encoder: {text_side: learned}}\n", "model.encoder.cps.simulator", "prepare simulator"),
    ("align", "      model: {encoder: {cps: {wer_min: 0.6, wer_max: 0.2}}}\n", "model.encoder.cps.wer_max", "wer_min <= wer_max"),
    ("select", "      selection: {source: synth, budget_unit: fraction}\n", "selection.pool", "not set"),
    ("asr", "      model: {llm: {load_in_4bit: true}}\n      trainer: {strategy: fsdp}\n", "trainer.strategy", "4/8-bit"),
]


@pytest.mark.parametrize("kind,block,key,words", RULES, ids=[f"{r[0]}:{r[2]}" for r in RULES])
def test_a_broken_rule_between_fields_fails_before_anything_runs(tmp_path, repo, nothing_may_run, kind, block, key, words):
    path = pipeline(tmp_path, repo, block, kind)
    with pytest.raises(ConfigError) as err:
        runner.run_pipeline(path, [], run_dir=str(tmp_path / "runs"))
    line = next((ln for ln in str(err.value).splitlines() if ln.strip().startswith(key)), None)
    assert line is not None and words in line, str(err.value)


def test_every_problem_of_a_stage_is_reported_at_once(tmp_path, repo, nothing_may_run):
    path = pipeline(tmp_path, repo, "      selection: {source: synth, budget_unit: fraction}\n", "select")
    with pytest.raises(ConfigError) as err:
        runner.run_pipeline(path, [], run_dir=str(tmp_path / "runs"))
    for key in ("selection.source", "selection.pool", "selection.natural"):
        assert key in str(err.value)
    assert "selection.pool (the schema default)" in str(err.value)


def test_the_cli_exits_2_with_the_message_and_writes_nothing(tmp_path, repo):
    path = pipeline(tmp_path, repo, "      optim: {schedule: cosin}\n")
    proc = subprocess.run([sys.executable, "-m", "stages", "run", path, "--run-dir", str(tmp_path / "runs")],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "optim.schedule" in proc.stderr and "cosin" in proc.stderr and "expected one of" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_shipped_pipelines_pass_validation(repo):
    for path in sorted((repo / "configs" / "pipeline").glob("*.yaml")):
        for _, _, cfg in runner.resolve_stage_configs(path, []):
            assert cfg.kind


def test_a_missing_model_path_fails_before_the_run_directory_is_written(tmp_path, repo, nothing_may_run):
    path = pipeline(tmp_path, repo, "      model: {llm: {from_config: null, pretrained: ./no/such/llm}}\n")
    with pytest.raises(ConfigError, match=r"stage 's': model.llm.pretrained: ./no/such/llm does not exist"):
        runner.run_pipeline(path, [], run_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()  # so the corrected command starts cleanly, not as a changed config
