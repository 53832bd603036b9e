"""Tiny stages through the runner from every source format (a map-style and a streamed Hugging Face
dataset, a Lhotse CutSet and Shar directory, TASU JSONL), for training, validation and the measures;
and a streamed source resumed after SIGKILL giving the losses and skip counts of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from source_fixtures import build_all, clips, hf_dataset

from stages.faults import wait_for_checkpoint
from stages.tensorboard import scalar_series

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_sources")
    env = pytest.MonkeyPatch()
    env.setenv("HF_DATASETS_CACHE", str(root / "hf-cache"))
    sources = build_all(root)
    rows = clips(root / "mc", 4, seed=9, prefix="m")
    rng = np.random.default_rng(0)
    hf_dataset(rows, options=[["a cat", "the dog", "we go"]] * 4, answer=rng.integers(0, 3, 4).tolist()).save_to_disk(
        str(root / "mc_saved"))
    sources["hf_mc"] = f"hf:{root / 'mc_saved'}?text=sentence&id=utt"
    yield root, sources
    env.undo()


def header(steps: int, checkpoint_every: int) -> str:
    return f"""
name: sources
include: ["{REPO / 'configs/model/tiny.yaml'}"]
defaults:
  seed: 0
  data: {{batch_size: 2, val_batch_size: 2}}
  trainer: {{accelerator: cpu, precision: 32-true, max_steps: {steps}, val_check_interval: {steps},
             checkpoint_every_n_steps: {checkpoint_every}, log_every_n_steps: 1, num_threads: 1,
             evaluate_before_training: false}}
  optim: {{lr: 1.0e-3, warmup_steps: 0}}
stages:
"""


def write_pipeline(root: Path, sources: dict[str, str]) -> Path:
    s = {k: json.dumps(v) for k, v in sources.items()}
    path = root / "sources.yaml"
    path.write_text(header(STEPS, 2) + f"""
  - name: asr_hf
    include: ["{REPO / 'configs/stage/asr.yaml'}"]
    config:
      data:
        sources:
          speech: {{manifest: {s['hf_map']}}}
          simulated: {{manifest: {s['hf_text_stream']}, share: {{end_step: {STEPS}}}}}
        val: {{clean: {s['hf_test']}}}
  - name: asr_lhotse
    include: ["{REPO / 'configs/stage/asr.yaml'}"]
    config:
      data:
        sources:
          speech: {{manifest: {s['lhotse_shar']}}}
          cuts: {{manifest: {s['lhotse']}, kind: speech}}
          simulated: {{share: {{start: 0.0}}}}
        val: {{tasu: {s['tasu']}}}
  - name: align_tasu
    config:
      kind: align
      data: {{train: {s['tasu']}, val: {{cuts: {s['lhotse']}}}}}
  - name: distill_mixed
    include: ["{REPO / 'configs/stage/distill.yaml'}"]
    config:
      distill: {{text_span_words: [2, 4], speech_span_words: [1, 3]}}
      data:
        sources:
          speech: {{manifest: {s['lhotse']}}}
          text: {{manifest: {s['hf_text_stream']}}}
      measures:
        sets: {{heldout: {s['hf_saved_stream']}}}
        multiple_choice: {{mc: {s['hf_mc']}}}
""")
    return path


@pytest.mark.parametrize("stage,evaluated", [
    ("asr_hf", ["val/clean/wer"]),
    ("asr_lhotse", ["val/tasu/wer"]),
    ("align_tasu", ["val/cuts/wer"]),
    ("distill_mixed", ["val/heldout/M", "val/heldout/F", "val/mc/acc_speech"]),
])
def test_a_stage_runs_from_each_format(corpus, stage, evaluated):
    from stages.runner import run_pipeline

    root, sources = corpus
    run_dir = root / "runs"
    metrics = run_pipeline(write_pipeline(root, sources), ["trainer.num_threads=1"], only=[stage], run_dir=str(run_dir))[stage]
    assert metrics["steps"] == STEPS
    for key in evaluated:
        assert np.isfinite(metrics[key]), (key, metrics)
    assert not [k for k, v in metrics.items() if k.startswith("skipped/") and v], metrics
    losses = scalar_series(run_dir / "sources" / stage / "tb")
    assert set(losses) == set(range(STEPS)) and all(np.isfinite(v) for v in losses.values())


def test_a_streamed_source_resumes_exactly_after_sigkill(corpus, tmp_path):
    from datasets import Audio, Dataset

    root, sources = corpus
    steps = 12
    # A stream (a saved dataset read as one, shuffled every epoch) with an empty transcript, an
    # undecodable clip and a clip longer than data.max_audio_seconds among 9 rows.
    rows = clips(tmp_path, 9, seed=11)
    sf.write(rows[7]["path"], np.zeros((int(22050 * 1.5), 2), np.float32), 22050)
    table = {"audio": [{"bytes": Path(r["path"]).read_bytes(), "path": None} for r in rows],
             "sentence": [r["text"] for r in rows], "utt": [r["id"] for r in rows]}
    table["sentence"][2] = ""
    table["audio"][4] = {"bytes": b"not audio" * 50, "path": "broken.flac"}
    Dataset.from_dict(table).cast_column("audio", Audio()).save_to_disk(str(tmp_path / "stream"))
    stream = json.dumps(f"hf:{tmp_path / 'stream'}?streaming=true&shuffle_buffer=3&text=sentence&id=utt")
    pipeline = tmp_path / "resume.yaml"
    pipeline.write_text(header(steps, 3) + f"""
  - name: asr_hf
    include: ["{REPO / 'configs/stage/asr.yaml'}"]
    config:
      data:
        max_audio_seconds: 1.25
        sources:
          speech: {{manifest: {stream}}}
          simulated: {{manifest: {json.dumps(sources['hf_text_stream'])}, share: {{end_step: {steps}}}}}
""")
    extra = ["trainer.num_threads=1"]

    def command(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "stages", "run", str(pipeline), "--run-dir", str(run_dir), *extra]

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    killed = tmp_path / "killed"
    stage = killed / "sources" / "asr_hf"
    proc = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, stage, 6)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(stage / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert 3 <= saved < steps and not (stage / "DONE").exists()

    rerun = subprocess.run(command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout and (stage / "DONE").is_file()
    clean = subprocess.run(command(tmp_path / "clean"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    clean_stage = tmp_path / "clean" / "sources" / "asr_hf"
    resumed, uninterrupted = scalar_series(stage / "tb"), scalar_series(clean_stage / "tb")
    assert set(resumed) == set(uninterrupted) == set(range(steps))
    assert [resumed[s] for s in range(steps)] == [uninterrupted[s] for s in range(steps)]  # exactly
    skips = {k: v for k, v in json.loads((clean_stage / "metrics.json").read_text()).items() if k.startswith("skipped/train")}
    assert skips == {"skipped/train/speech/bad_row": 1, "skipped/train/speech/unreadable_audio": 1,
                     "skipped/train/speech/too_long": 1}
    again = {k: v for k, v in json.loads((stage / "metrics.json").read_text()).items() if k.startswith("skipped/train")}
    assert again == skips
