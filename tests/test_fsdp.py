"""FSDP (``trainer.strategy: fsdp``, FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes
(gloo): it trains, checkpoints, is killed, resumes, and gives DDP's losses and weights."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from test_e2e_stages import REPO, command, pipeline_for

from speechllm.model import SpeechLLM
from stages.faults import Workspace
from stages.tensorboard import scalar_series

TWO_PROCESSES = ("trainer.devices=2", "trainer.collective_timeout_s=120")
# Same seed, data and model: the sharded run must reproduce the replicated one. FSDP sums gradients in
# another order (reduce-scatter of shards), so allow float32 rounding, no more.
LOSS_RTOL = 1e-5


def losses(ws: Workspace) -> list[float]:
    series = scalar_series(ws.stage / "tb", "train/loss")
    return [series[step] for step in sorted(series)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("ddp"), "ddp")
    proc = ws.run(*TWO_PROCESSES, "trainer.strategy=ddp")
    assert proc.returncode == 0 and ws.done(), proc.stderr[-3000:]
    return ws


def test_fsdp_killed_and_resumed_matches_ddp(ddp_run, tmp_path):
    ws = Workspace(tmp_path, "fsdp")
    args = (*TWO_PROCESSES, "trainer.strategy=fsdp")
    proc = ws.popen(*args)
    ws.wait_for_step(proc, 4)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = ws.saved_step()
    assert saved is not None and 4 <= saved < 8 and not ws.done()

    resumed = ws.run(*args)
    assert resumed.returncode == 0 and ws.done(), resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "resuming" in output
    # Sharded, not replicated: each of the two ranks holds about half of the LLM (the tied embedding
    # and the norms split unevenly by rows).
    held = {int(r): (int(a.replace(",", "")), int(b.replace(",", "")))
            for r, a, b in re.findall(r"\[fsdp\] rank (\d): holds ([\d,]+) of the LLM's ([\d,]+) weights", output)}
    assert set(held) == {0, 1}
    for part, whole in held.values():
        assert 0.4 * whole < part < 0.6 * whole

    assert len(losses(ws)) == len(losses(ddp_run)) == 8
    assert losses(ws) == pytest.approx(losses(ddp_run), rel=LOSS_RTOL)
    sharded, replicated = (load_file(str(w.stage / "model" / "trainable.safetensors")) for w in (ws, ddp_run))
    assert sharded.keys() == replicated.keys()
    for name in sharded:
        torch.testing.assert_close(sharded[name], replicated[name], rtol=1e-4, atol=1e-6, msg=name)
    # The export is an ordinary model: it loads and runs in one process.
    model = SpeechLLM.from_pretrained(ws.stage / "model")
    assert len(model.transcribe([torch.zeros(8000)])) == 1


def stage_run(pipeline, run_dir, *extra: str) -> list[float]:
    proc = subprocess.run(command(pipeline, run_dir, *TWO_PROCESSES, *extra), cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    series = scalar_series(next(run_dir.glob("*/*/tb")), "train/loss")
    return [series[step] for step in sorted(series)]


# LoRA with per-layer activation checkpointing (frozen, LoRA and projector weights in one unit), and
# full fine-tuning of the LLM with its frozen teacher copy sharded too (distillation, alpha 1).
TRAINED_LLMS = {
    "lora+checkpointing": ("--only", "asr", "init_from=null", "model.llm.lora.enabled=true",
                           "model.llm.gradient_checkpointing=true"),
    "full fine-tune, teacher copy": ("--only", "distill", "init_from=null", "model.llm.lora.enabled=false",
                                     "model.llm.freeze=false", "optim.lr_llm=1e-3"),
}


@pytest.mark.parametrize("variant", list(TRAINED_LLMS))
def test_fsdp_trains_the_llm_like_ddp(variant, tmp_path, tiny_data):
    pipeline = pipeline_for(tmp_path, tiny_data)
    common = (*TRAINED_LLMS[variant], "trainer.max_steps=6")
    replicated = stage_run(pipeline, tmp_path / "ddp", "trainer.strategy=ddp", *common)
    sharded = stage_run(pipeline, tmp_path / "fsdp", "trainer.strategy=fsdp", *common)
    assert len(sharded) == 6 and sharded == pytest.approx(replicated, rel=LOSS_RTOL)
    assert replicated[-1] < replicated[0]  # the LLM's weights did move the loss
