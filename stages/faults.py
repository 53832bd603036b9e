"""``python -m stages faults``: inject each fault of the robustness contract into a tiny pipeline run
and print what happened and what was lost (the answer must always be "none").

Faults: bad input (missing, unreadable, wrong-rate, too-long audio; empty or non-text transcripts;
NaN input giving non-finite losses), bad configs (unknown key, missing model path), a sequence longer
than the LLM's context, a full disk while saving a checkpoint, SIGKILL during training and during a
checkpoint write, and one rank of a two-process job dying. Each runs the real CLI in a subprocess on
random tiny models (``configs/model/tiny.yaml``) and synthetic data.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from stages.prepare_tiny_data import prepare_tiny_data
from stages.tensorboard import scalar_series

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


@dataclass
class Outcome:
    fault: str
    happened: str
    lost: str
    ok: bool

    def __post_init__(self) -> None:
        self.ok = bool(self.ok)  # numpy booleans from the checks


def write_pipeline(folder: Path, data: Path, train: Path, extra: str = "") -> Path:
    path = folder / "faults.yaml"
    path.write_text(f"""
name: faults
include: ["{REPO / 'configs/model/tiny.yaml'}"]
defaults:
  data: {{batch_size: 4, val_batch_size: 4}}
  trainer: {{accelerator: cpu, precision: 32-true, max_steps: {STEPS}, val_check_interval: {STEPS},
             checkpoint_every_n_steps: 2, log_every_n_steps: 1, num_threads: 1, evaluate_before_training: false}}
stages:
  - name: asr
    config:
      kind: asr
      data:
        sources: {{speech: {{manifest: "{train}"}}}}
        val: {{noise: "{data / 'speech/val.jsonl'}"}}
      optim: {{lr: 1.0e-3, warmup_steps: 2}}
{extra}""")
    return path


class Workspace:
    """A fresh tiny data set and pipeline in a temporary folder for one fault."""

    def __init__(self, root: Path, name: str):
        self.dir = root / name
        self.data = self.dir / "data"
        prepare_tiny_data(self.data, n_train_speech=8)
        self.train = self.data / "speech" / "train.jsonl"
        self.runs = self.dir / "runs"
        self.pipeline = write_pipeline(self.dir, self.data, self.train)

    @property
    def stage(self) -> Path:
        return self.runs / "faults" / "asr"

    def add_line(self, row: dict) -> None:
        with self.train.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def add_wav(self, name: str, wav: np.ndarray, rate: int, subtype: str = "PCM_16") -> str:
        rel = f"wav/{name}.wav"
        sf.write(self.data / "speech" / rel, wav, rate, subtype=subtype)
        return rel

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "stages", "run", str(self.pipeline), "--run-dir", str(self.runs), *extra]

    def run(self, *extra: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run(self.command(*extra), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def metrics(self) -> dict:
        path = self.stage / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def done(self) -> bool:
        return (self.stage / "DONE").is_file()

    def saved_step(self) -> int | None:
        ckpt = self.stage / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            return None
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])

    def wait_for_step(self, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        progress = self.stage / "progress.json"
        while time.time() < deadline:
            if progress.is_file():
                try:
                    if json.loads(progress.read_text())["step"] >= step:
                        return
                except (json.JSONDecodeError, KeyError):
                    pass
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended (exit {proc.returncode}) before step {step}")
            time.sleep(0.02)
        raise TimeoutError(f"no checkpoint at step {step} within {timeout} s")

    def kill_at_step(self, step: int) -> int:
        """Start a run, SIGKILL it once ``last.ckpt`` holds ``step``; return the checkpointed step."""
        proc = self.popen()
        self.wait_for_step(proc, step)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return self.saved_step()

    def popen(self, *extra: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(self.command(*extra), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)


def last_error(proc) -> str:
    """The CLI's own ``error:`` line, else the last line of stderr."""
    lines = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [f"exit {proc.returncode}"])[-1][:200]


def finished_with(ws: Workspace, proc, key: str) -> tuple[bool, int]:
    metrics = ws.metrics()
    return proc.returncode == 0 and ws.done(), int(metrics.get(key, 0))


# ------------------------------------------------------------------------------------------- faults


def skip_fault(name: str, reason: str, make_row):
    def fault(root: Path) -> Outcome:
        ws = Workspace(root, name)
        ws.add_line(make_row(ws))
        proc = ws.run()
        done, skipped = finished_with(ws, proc, f"skipped/train/speech/{reason}")
        ok = done and skipped == 1
        happened = f"skipped and counted (skipped/train/speech/{reason} = {skipped}); stage finished" if ok else last_error(proc)
        return Outcome(name, happened, "none (the bad clip is counted, the rest trained)" if ok else "?", ok)
    return fault


def bad_manifest_fault(name: str, text) -> callable:
    def fault(root: Path) -> Outcome:
        ws = Workspace(root, name)
        ws.add_line({"id": "bad", "audio": "wav/train000.wav", "text": text})
        proc = ws.run()
        message = last_error(proc)
        line = len(ws.train.read_text().splitlines())
        ok = proc.returncode == 2 and f"{ws.train}:{line}" in message and "'text'" in message
        nothing = not (ws.stage / "checkpoints").exists()
        return Outcome(name, f"error before training: {message.removeprefix('error: ')}",
                       "none (nothing was trained or written)" if nothing else "?", ok and nothing)
    return fault


def nan_input(root: Path) -> Outcome:
    ws = Workspace(root, "nan_loss")
    wav = np.full(16000, np.nan, dtype=np.float32)
    ws.add_line({"id": "nan", "audio": ws.add_wav("nan", wav, 16000, "FLOAT"), "text": "a clip of nan samples"})
    proc = ws.run()
    done, skipped = finished_with(ws, proc, "skipped/nonfinite_steps")
    loss = ws.metrics().get("train_loss_last")
    ok = done and skipped >= 1 and loss is not None and np.isfinite(loss)
    return Outcome("NaN/inf loss", f"{skipped} step(s) with non-finite gradients skipped and counted; "
                   f"final loss {loss:.3f} (finite)" if ok else last_error(proc),
                   "none (weights never took a NaN step)" if ok else "?", ok)


def nan_forever(root: Path) -> Outcome:
    ws = Workspace(root, "nan_every_step")
    wav = np.full(16000, np.nan, dtype=np.float32)
    rel = ws.add_wav("nan", wav, 16000, "FLOAT")
    ws.train.write_text("".join(json.dumps({"id": f"nan{i}", "audio": rel, "text": "nan"}) + "\n" for i in range(4)))
    proc = ws.run("trainer.max_nonfinite_steps=3")
    message = last_error(proc)
    ok = proc.returncode != 0 and "in a row had NaN/inf gradients" in (proc.stderr or "")
    return Outcome("NaN loss at every step", "stopped with a clear error after 3 skipped steps in a row" if ok else message,
                   "none (no NaN weights were saved)" if ok else "?", ok)


def unknown_key(root: Path) -> Outcome:
    ws = Workspace(root, "unknown_config_key")
    proc = ws.run("optim.lrr=0.1")
    message = last_error(proc)
    ok = proc.returncode == 2 and "optim.lrr" in message and "command-line override" in message
    return Outcome("unknown config key", f"error at load time: {message.removeprefix('error: ')}",
                   "none (nothing ran)", ok and not ws.stage.exists())


def missing_model(root: Path) -> Outcome:
    ws = Workspace(root, "missing_model_path")
    proc = ws.run("model.llm.from_config=null", "model.llm.pretrained=./no/such/llm")
    message = last_error(proc)
    ok = proc.returncode == 2 and "model.llm.pretrained" in message and "does not exist" in message
    return Outcome("missing model path", f"error before loading: {message.removeprefix('error: ')}",
                   "none (nothing ran)", ok and not (ws.stage / "checkpoints").exists())


def context_overflow(root: Path) -> Outcome:
    ws = Workspace(root, "context_overflow")
    proc = ws.run("model.llm.from_config.max_position_embeddings=96", "model.prompt.max_target_tokens=24",
                  "model.generation.max_new_tokens=8")
    done, cut = finished_with(ws, proc, "skipped/truncated_to_context")
    ok = done and cut > 0
    return Outcome("sequence longer than the LLM context", f"speech cut to fit before the forward in {cut} row(s), "
                   "counted; stage finished" if ok else last_error(proc), "none (cut, counted)" if ok else "?", ok)


def kill_during_training(root: Path) -> Outcome:
    ws = Workspace(root, "sigkill_training")
    saved = ws.kill_at_step(4)
    rerun = ws.run()
    clean = Workspace(root, "sigkill_training_reference")
    clean.run()
    resumed, reference = scalar_series(ws.stage / "tb"), scalar_series(clean.stage / "tb")
    same = set(resumed) == set(reference) == set(range(STEPS)) and all(
        abs(resumed[s] - reference[s]) < 1e-6 for s in reference)
    ok = rerun.returncode == 0 and ws.done() and same and saved is not None
    return Outcome("SIGKILL during training", f"killed at step >= 4 (checkpoint step {saved}); re-run resumed there, "
                   f"losses equal an uninterrupted run at all {STEPS} steps" if ok else last_error(rerun),
                   "none" if ok else "?", ok)


def kill_during_save(root: Path) -> Outcome:
    ws = Workspace(root, "sigkill_checkpoint_write")
    checkpoints = ws.stage / "checkpoints"
    for _attempt in range(5):
        proc = ws.popen()
        caught = None
        while proc.poll() is None:
            # Only once a last.ckpt exists: the point is that a torn write never costs the one before.
            ready = (checkpoints / "last.ckpt").exists()
            temps = list(checkpoints.glob(".*.tmp")) if ready else []
            if temps:
                os.killpg(proc.pid, signal.SIGKILL)
                caught = temps[0].name
                break
            time.sleep(0.0005)
        proc.wait()
        if caught:
            break
        # The save was too quick to catch: start again from scratch.
        subprocess.run(["rm", "-rf", str(ws.runs)], check=True)
    loads = ws.saved_step() if (checkpoints / "last.ckpt").exists() else "absent"
    rerun = ws.run()
    ok = caught is not None and loads != "absent" and rerun.returncode == 0 and ws.done()
    return Outcome("SIGKILL while writing a checkpoint",
                   f"killed with {caught} half-written; the earlier last.ckpt loads (step {loads}); re-run resumed and "
                   "finished" if ok else (last_error(rerun) if caught else "could not catch a save in 5 tries"),
                   "none (the half-written file is never read)" if ok else "?", ok)


def disk_full(root: Path) -> Outcome:
    ws = Workspace(root, "disk_full_on_save")
    before = ws.kill_at_step(2)
    size = (ws.stage / "checkpoints" / "last.ckpt").stat().st_size

    def limit_file_size() -> None:  # the kernel refuses to grow any file past this: a full disk for writes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    full = ws.run(preexec_fn=limit_file_size)
    message = next((line for line in reversed((full.stderr or "").splitlines()) if "could not write checkpoint" in line), "")
    after = ws.saved_step()
    rerun = ws.run()
    ok = full.returncode != 0 and "intact" in message and after == before and rerun.returncode == 0 and ws.done()
    return Outcome("disk full while saving", f"save failed with a clear error ({message.split(': ', 1)[-1][:90]}); "
                   f"last.ckpt still step {after}; re-run with space finished" if ok else last_error(full),
                   "none (the previous checkpoint is intact)" if ok else "?", ok)


def rank_dies(root: Path) -> Outcome:
    ws = Workspace(root, "rank_failure")
    args = ("trainer.devices=2", "trainer.strategy=ddp", "trainer.collective_timeout_s=60", "trainer.max_steps=300",
            "trainer.val_check_interval=300")
    proc = ws.popen(*args)
    ws.wait_for_step(proc, 4)
    # The job's other processes: the ranks Lightning started, in the session of the one we launched.
    session = subprocess.run(["ps", "-o", "pid=", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    victims = [int(p) for p in session if int(p) != proc.pid]
    start = time.time()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=180)
        ended = time.time() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        ended = None
    saved = ws.saved_step()
    rerun = ws.run(*args)
    ok = bool(victims) and ended is not None and proc.returncode != 0 and rerun.returncode == 0 and ws.done()
    return Outcome("one rank of two dies (SIGKILL)",
                   f"rank 0 ended {ended:.0f} s later with an error (not a hang); re-run resumed from step {saved} and "
                   "finished" if ok else f"victims {victims}, ended {ended}, rerun: {last_error(rerun)}",
                   "none (last.ckpt intact)" if ok else "?", ok)


def _garbage(ws: Workspace) -> dict:
    (ws.data / "speech" / "wav" / "garbage.wav").write_bytes(b"this is not a sound file" * 10)
    return {"id": "garbage", "audio": "wav/garbage.wav", "text": "unreadable"}


FAULTS = {
    "missing audio": skip_fault("missing audio", "missing_audio",
                                lambda ws: {"id": "gone", "audio": "wav/gone.wav", "text": "no such file"}),
    "unreadable audio": skip_fault("unreadable audio", "unreadable_audio", _garbage),
    "wrong sample rate": skip_fault("wrong sample rate", "wrong_sample_rate", lambda ws: {
        "id": "rate8k", "audio": ws.add_wav("rate8k", np.zeros(8000, np.float32), 8000), "text": "eight kilohertz"}),
    "audio too long": skip_fault("audio too long", "too_long", lambda ws: {
        "id": "long", "audio": ws.add_wav("long", np.zeros(16000 * 31, np.float32), 16000), "text": "thirty one seconds"}),
    "empty transcript": bad_manifest_fault("empty transcript", ""),
    "non-text transcript": bad_manifest_fault("non-text transcript", 42),
    "NaN/inf loss": nan_input,
    "NaN loss at every step": nan_forever,
    "unknown config key": unknown_key,
    "missing model path": missing_model,
    "sequence longer than the LLM context": context_overflow,
    "disk full while saving": disk_full,
    "SIGKILL during training": kill_during_training,
    "SIGKILL while writing a checkpoint": kill_during_save,
    "one rank of two dies": rank_dies,
}


def run_faults(only: list[str] | None = None, out: Path | None = None) -> list[Outcome]:
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        for name, fault in FAULTS.items():
            if only and not any(o in name for o in only):
                continue
            start = time.time()
            print(f"[faults] {name} ...", flush=True)
            try:
                outcome = fault(Path(tmp))
            except Exception as err:  # a fault scenario that breaks is itself a failed row
                outcome = Outcome(name, f"scenario failed: {type(err).__name__}: {err}", "?", False)
            print(f"[faults] {name}: {'ok' if outcome.ok else 'FAILED'} ({time.time() - start:.0f} s)", flush=True)
            outcomes.append(outcome)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    return outcomes


def format_table(outcomes: list[Outcome]) -> str:
    lines = ["| fault | what happened | data lost |", "|---|---|---|"]
    lines += [f"| {o.fault} | {o.happened} | {o.lost} |" for o in outcomes]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="*", help="substrings of fault names to run")
    parser.add_argument("--out", type=Path, default=Path("runs/faults/faults.json"),
                        help="the outcomes as JSON; scenarios run in a temporary folder (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    outcomes = run_faults(args.only, args.out)
    print(format_table(outcomes))
    failed = [o.fault for o in outcomes if not o.ok]
    if failed:
        print(f"\nfaults not handled as required: {failed}", file=sys.stderr)
    return 1 if failed else 0
