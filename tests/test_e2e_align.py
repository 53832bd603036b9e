"""Stage 1 end to end through the runner on tiny models: SIGKILL mid-stage, re-run, exact resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hand_reference import sharpen, word_edits

from stages.tensorboard import scalar_events, scalar_series

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 60


def write_pipeline(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(f"""
name: e2e
include: ["{REPO / 'configs/model/tiny.yaml'}"]
defaults:
  data: {{batch_size: 4, val_batch_size: 4}}
  trainer: {{accelerator: cpu, precision: 32-true, max_steps: {MAX_STEPS}, val_check_interval: 30,
             checkpoint_every_n_steps: 5, log_every_n_steps: 1, num_threads: 1}}
stages:
  - name: align
    config:
      kind: align
      data: {{train: "{data / 'text/train.jsonl'}", val: {{noise: "{data / 'speech/val.jsonl'}"}}}}
      optim: {{lr: 1.0e-3, warmup_steps: 5}}
""")
    return path


def command(pipeline: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "stages", "run", str(pipeline), "--run-dir", str(run_dir)]


def test_sigkill_then_rerun_resumes_exactly(tmp_path, tiny_data):
    pipeline = write_pipeline(tmp_path, tiny_data)
    killed_dir = tmp_path / "killed"
    stage = killed_dir / "e2e" / "align"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    proc = subprocess.Popen(command(pipeline, killed_dir), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        progress = stage / "progress.json"
        if progress.is_file() and json.loads(progress.read_text())["step"] >= 15:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    saved = torch.load(stage / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["global_step"]
    assert 5 <= saved < MAX_STEPS and not (stage / "DONE").exists()

    before = set((stage / "tb").glob("events.out.tfevents.*"))
    rerun = subprocess.run(command(pipeline, killed_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Lightning logs a step after writing its checkpoint: the resumed run logs that step again, from the
    # checkpoint, so a kill between the two leaves no hole in the curve.
    new_events = set((stage / "tb").glob("events.out.tfevents.*")) - before
    assert new_events, sorted(before)
    assert any(saved - 1 in scalar_series(f) for f in new_events), sorted(new_events)
    assert "resuming" in rerun.stdout
    assert (stage / "DONE").is_file() and (stage / "model" / "trainable.safetensors").is_file()
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["steps"] == MAX_STEPS and "val/noise/wer" in metrics
    resumed = scalar_series(stage / "tb")
    assert set(resumed) == set(range(MAX_STEPS))  # TensorBoard has every step exactly once

    # The same pipeline run without interruption gives the same loss at every step.
    clean = subprocess.run(command(pipeline, tmp_path / "clean"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    uninterrupted = scalar_series(tmp_path / "clean" / "e2e" / "align" / "tb")
    for step in range(MAX_STEPS):
        assert abs(resumed[step] - uninterrupted[step]) <= 1e-6, (step, resumed[step], uninterrupted[step])
    # Validated before training and at steps 30 and 60 inside fit (logged at the steps just done); the
    # final metrics are step 60's, not those of a second validation of the same weights.
    validations = scalar_events(tmp_path / "clean" / "e2e" / "align" / "tb", "val/noise/wer")
    assert [step for step, _ in validations] == [0, 29, 59], validations
    clean_metrics = json.loads((tmp_path / "clean" / "e2e" / "align" / "metrics.json").read_text())
    assert clean_metrics["val/noise/wer"] == pytest.approx(validations[-1][1])

    # A third run finds the stage DONE and skips it.
    again = subprocess.run(command(pipeline, killed_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "DONE" in again.stdout and "skipping" in again.stdout


def test_changed_config_is_refused_unless_redo_force(tmp_path, tiny_data):
    """A finished stage whose config changed is refused; --redo alone does not discard it; --redo --force
    moves it aside (kept whole) and runs it again with the new config."""
    pipeline = write_pipeline(tmp_path, tiny_data)
    run_dir = tmp_path / "runs"
    base = command(pipeline, run_dir) + ["trainer.max_steps=4", "trainer.val_check_interval=4"]
    assert subprocess.run(base, cwd=REPO, capture_output=True, timeout=600).returncode == 0
    changed = subprocess.run(base + ["optim.lr=0.5"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert changed.returncode == 2 and "optim.lr: 0.001 -> 0.5" in changed.stderr and "--redo --force" in changed.stderr
    redo = subprocess.run(base + ["optim.lr=0.5", "--redo"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert redo.returncode == 2 and "--force" in redo.stderr and (run_dir / "e2e" / "align" / "DONE").is_file()
    forced = subprocess.run(base + ["optim.lr=0.5", "--redo", "--force"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "lr: 0.5" in (run_dir / "e2e" / "align" / "config.yaml").read_text()
    (kept,) = (run_dir / "e2e").glob("align.replaced-*")
    assert "lr: 0.001" in (kept / "config.yaml").read_text() and (kept / "DONE").is_file()


def tasu_by_hand(text: str) -> str:
    """TASU's scorer: lowercase, every punctuation mark (apostrophes too) removed, single spaces."""
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def test_decode_cli_writes_hypotheses_with_error_counts(tmp_path, tiny_data, tiny_model_cfg):
    from speechllm.config import GenerationConfig
    from speechllm.manifest import load_audio
    from speechllm.model import SpeechLLM

    # An exported model whose LLM is the tiny one sharpened (saved to disk, named by path): a random
    # tiny LLM says the same newline at every step, so its hypotheses are empty whatever the options.
    torch.manual_seed(0)
    model = SpeechLLM.build(tiny_model_cfg)
    sharpen(model.llm)
    model.llm.save_pretrained(tmp_path / "llm")
    model.tokenizer.save_pretrained(tmp_path / "llm")
    model.cfg.llm.from_config, model.cfg.llm.pretrained = None, str(tmp_path / "llm")
    model.save_pretrained(tmp_path / "model")
    manifest = tiny_data / "speech/val.jsonl"
    out = tmp_path / "hyps.jsonl"
    dec = subprocess.run([sys.executable, "-m", "stages", "decode", "--model", str(tmp_path / "model"),
                          "--manifest", str(manifest), "--out", str(out), "--beam", "2",
                          "--max-new-tokens", "12", "--no-repeat-ngram", "2", "--normalizer", "tasu"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert dec.returncode == 0, dec.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    refs = {r["id"]: r["text"] for r in map(json.loads, manifest.read_text().splitlines())}
    assert [r["id"] for r in rows] == list(refs) and all(r["ref"] == refs[r["id"]] for r in rows)
    hyps = [r["hyp"] for r in rows]
    assert all(tasu_by_hand(h) for h in hyps), hyps
    # The options reached the decoder: the same model in this process, with and without each.
    again = SpeechLLM.from_pretrained(tmp_path / "model").eval()
    wavs = [load_audio(manifest.parent / r["audio"], 16000) for r in map(json.loads, manifest.read_text().splitlines())]

    def decode(beams: int, no_repeat: int) -> list[str]:
        return again.transcribe(wavs, GenerationConfig(num_beams=beams, max_new_tokens=12, no_repeat_ngram_size=no_repeat))

    assert hyps == decode(2, 2) and hyps != decode(1, 2) and hyps != decode(2, 0)
    for h in hyps:  # the tiny LLM reads characters: one token each, so no character pair repeats
        pairs = [h[i : i + 2] for i in range(len(h) - 1)]
        assert len(pairs) == len(set(pairs)), h
    # S/D/I recounted: TASU normalisation and the word edit distance by hand; D - I is the length change.
    errors = words = 0
    for r in rows:
        ref, hyp = tasu_by_hand(r["ref"]), tasu_by_hand(r["hyp"])
        assert (r["ref_norm"], r["hyp_norm"]) == (ref, hyp)
        edits = word_edits(ref, hyp)
        assert r["substitutions"] + r["deletions"] + r["insertions"] == edits, r
        assert r["deletions"] - r["insertions"] == len(ref.split()) - len(hyp.split()), r
        assert r["ref_words"] == len(ref.split())
        errors, words = errors + edits, words + len(ref.split())
    assert errors > 0 and f"WER {errors / words:.4f}" in dec.stdout


def test_bf16_autocast_and_lora_run_on_cpu(tmp_path, tiny_data):
    pipeline = write_pipeline(tmp_path, tiny_data)
    losses = {}
    for precision in ("bf16-mixed", "32-true"):
        run = command(pipeline, tmp_path / precision) + ["trainer.max_steps=3", "trainer.val_check_interval=3",
                                                        f"trainer.precision={precision}", "model.llm.lora.enabled=true"]
        proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        stage = tmp_path / precision / "e2e/align"
        metrics = json.loads((stage / "metrics.json").read_text())
        assert metrics["steps"] == 3 and metrics["precision"] == precision
        losses[precision] = scalar_series(stage / "tb")
    bf16, fp32 = losses["bf16-mixed"], losses["32-true"]
    assert set(bf16) == set(fp32) == {0, 1, 2}
    # The first step sees the same weights and batch: bf16 was on if its loss moved by more than a
    # float32 rerun does (<= 1e-6, the resume tests), and by less than one bf16 rounding (seen 4.8e-5).
    assert abs(bf16[0] - fp32[0]) > 1e-6 and bf16[0] == pytest.approx(fp32[0], rel=2**-8), (bf16[0], fp32[0])
    assert all(math.isfinite(v) for v in bf16.values())
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "bf16-mixed/e2e/align/model/trainable.safetensors"))
    assert any("lora_A" in k for k in saved) and any(k.startswith("projector.") for k in saved)
