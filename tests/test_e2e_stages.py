"""Stages 2-4 end to end through the runner on tiny models: SIGKILL and exact resume, and the whole
pipeline on two processes (DDP over gloo) producing what one process produces."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages.tensorboard import scalar_series

REPO = Path(__file__).resolve().parents[1]


def pipeline_for(tmp_path: Path, data: Path) -> Path:
    """configs/pipeline/tiny.yaml pointed at this test's data."""
    text = (REPO / "configs/pipeline/tiny.yaml").read_text().replace("data/tiny/", f"{data}/")
    text = text.replace("../model/", f"{REPO}/configs/model/").replace("../stage/", f"{REPO}/configs/stage/")
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def command(pipeline: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stages", "run", str(pipeline), "--run-dir", str(run_dir), "trainer.num_threads=1", *extra]


@pytest.mark.parametrize("stage", ["asr", "distill", "select"])
def test_stage_resumes_exactly_after_sigkill(stage, tmp_path, tiny_data):
    steps = 16
    pipeline = pipeline_for(tmp_path, tiny_data)
    extra = ("--only", stage, "init_from=null", f"trainer.max_steps={steps}", "trainer.val_check_interval=16",
             "trainer.checkpoint_every_n_steps=4", "trainer.evaluate_before_training=false")
    killed = tmp_path / "killed"
    stage_dir = killed / "tiny" / stage
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command(pipeline, killed, *extra), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        progress = stage_dir / "progress.json"
        if progress.is_file() and json.loads(progress.read_text())["step"] >= 8:
            break
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(stage_dir / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert 8 <= saved < steps and not (stage_dir / "DONE").exists()

    rerun = subprocess.run(command(pipeline, killed, *extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout and (stage_dir / "DONE").is_file()
    clean = subprocess.run(command(pipeline, tmp_path / "clean", *extra), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=900)
    assert clean.returncode == 0, clean.stderr[-3000:]
    resumed, uninterrupted = scalar_series(stage_dir / "tb"), scalar_series(tmp_path / "clean" / "tiny" / stage / "tb")
    assert set(resumed) == set(uninterrupted) == set(range(steps))
    for step in range(steps):
        assert abs(resumed[step] - uninterrupted[step]) <= 1e-6, (step, resumed[step], uninterrupted[step])


def stage_outputs(stage: Path) -> dict:
    metrics = json.loads((stage / "metrics.json").read_text())
    return {"files": sorted(p.name for p in stage.iterdir() if p.name not in ("tb",)),
            "model": sorted(p.name for p in (stage / "model").iterdir()),
            "metrics": sorted(k for k in metrics if not k.startswith("train_loss_curve")),
            "steps": metrics["steps"]}


WHOLE = ("trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.checkpoint_every_n_steps=2")


def run_whole_pipeline(pipeline: Path, run_dir: Path, devices: int) -> Path:
    proc = subprocess.run(command(pipeline, run_dir, *WHOLE, f"trainer.devices={devices}", "trainer.collective_timeout_s=120"),
                          cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "tiny"


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_data) -> tuple[Path, Path]:
    """The whole tiny pipeline on one process: (pipeline file, run directory)."""
    root = tmp_path_factory.mktemp("whole")
    pipeline = pipeline_for(root, tiny_data)
    return pipeline, run_whole_pipeline(pipeline, root / "devices1", 1)


def test_every_stage_runs_on_two_processes_like_on_one(tmp_path, one_process_run):
    pipeline, one_run = one_process_run
    two_run = run_whole_pipeline(pipeline, tmp_path / "devices2", 2)
    for stage in ("align", "asr", "distill", "select"):
        one, two = stage_outputs(one_run / stage), stage_outputs(two_run / stage)
        assert one == two, stage
        assert "DONE" in two["files"] and "trainable.safetensors" in two["model"]
    # Two ranks share the selection work; its result is the same set of synthesised texts.
    selected = [[json.loads(line)["id"] for line in (run / "select/selection/synthetic/selected.jsonl").open()]
                for run in (one_run, two_run)]
    assert selected[0] == selected[1]


def test_report_covers_every_stage_and_the_baselines(one_process_run):
    pipeline, run = one_process_run
    proc = subprocess.run([sys.executable, "-m", "stages", "report", str(pipeline), "--run-dir", str(run.parent)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert set(report["stages"]) == {"align", "asr", "distill", "select"}
    base = next(iter(report["baselines"].values()))
    assert 0 <= base["ctc_greedy_wer"] and 0 <= base["llm_text_ceiling_wer"]
    for stage in report["stages"]:
        assert f"-- {stage} (" in proc.stdout
        assert json.loads((run / stage / "metrics.json").read_text())["report"]["baselines"] == report["baselines"]
    assert "-- select: selection (gamma" in proc.stdout and "selected topics:" in proc.stdout
