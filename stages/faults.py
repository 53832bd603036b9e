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
import hashlib
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


def wait_for_checkpoint(proc: subprocess.Popen, stage: Path, step: int, timeout: float = 300) -> None:
    """Return once the stage directory's ``progress.json`` (written after each complete ``last.ckpt``)
    reaches ``step``; raise if the run ends first or ``timeout`` passes."""
    deadline = time.time() + timeout
    progress = stage / "progress.json"
    while time.time() < deadline:
        if progress.is_file():
            try:
                if json.loads(progress.read_text())["step"] >= step:
                    return
            except (json.JSONDecodeError, KeyError):
                pass
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before step {step}: "
                               f"{(proc.stderr.read() if proc.stderr else '')[-2000:]}")
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint at step {step} within {timeout} s")


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
        wait_for_checkpoint(proc, self.stage, step, timeout)

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

    def snapshot(self) -> dict[str, str]:
        """Every file of the run directory and a digest of its bytes."""
        return {str(p.relative_to(self.runs)): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in sorted(self.runs.rglob("*")) if p.is_file()}

    def changed_since(self, before: dict[str, str]) -> list[str]:
        """The files added, removed or rewritten since ``before``."""
        after = self.snapshot()
        return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


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
    stopped = proc.returncode != 0 and "in a row had NaN/inf gradients" in (proc.stderr or "")
    ckpt = ws.stage / "checkpoints" / "last.ckpt"
    weights = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"] if ckpt.is_file() else {}
    finite = all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())
    ok = stopped and finite and not ws.done()
    saved = f"last.ckpt holds {len(weights)} finite tensors" if weights else "no checkpoint was written"
    return Outcome("NaN loss at every step", "stopped with a clear error after 3 skipped steps in a row" if stopped else message,
                   f"none (no NaN weights were saved: {saved})" if ok else "?", ok)


def config_fault(name: str, folder: str, overrides: tuple[str, ...], expected: tuple[str, ...], *, over_a_run: bool):
    """A bad command must stop with a clear error before anything runs. ``over_a_run``: over a stage
    that already holds a checkpoint, every file of which must stay as it was (compared byte by byte);
    otherwise in a fresh run directory, after which the corrected command must train and finish (a
    changed model path over a run is refused as a changed config first, hence not tried there)."""
    def fault(root: Path) -> Outcome:
        ws = Workspace(root, folder)
        step = ws.kill_at_step(2) if over_a_run else None
        before = ws.snapshot() if ws.runs.exists() else {}
        proc = ws.run(*overrides)
        message = last_error(proc)
        ok = proc.returncode == 2 and all(text in message for text in expected)
        changed = ws.changed_since(before) if ws.runs.exists() else []
        if over_a_run:
            kept = not changed and step is not None
            lost = (f"none (the earlier run's {len(before)} files, last.ckpt of step {step} among them, unchanged)"
                    if kept else f"? (changed: {', '.join(changed[:3])})")
        else:
            fixed = ws.run()
            kept = fixed.returncode == 0 and ws.done()
            wrote = f"wrote {', '.join(changed[:3])}" if changed else "wrote nothing"
            lost = (f"none ({wrote}; the corrected command then trained and finished)" if kept
                    else f"? ({wrote}; the corrected command: {last_error(fixed)})")
        return Outcome(name, f"error before anything ran: {message.removeprefix('error: ')}", lost, ok and kept)
    return fault


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


RANK_TIMEOUT_S = 60  # trainer.collective_timeout_s of the two-process job
RANK_MARGIN_S = 30  # teardown after the timeout; a survivor still running past both is a hang


def rank_dies(root: Path) -> Outcome:
    ws = Workspace(root, "rank_failure")
    args = ("trainer.devices=2", "trainer.strategy=ddp", f"trainer.collective_timeout_s={RANK_TIMEOUT_S}",
            "trainer.max_steps=300", "trainer.val_check_interval=300")
    proc = ws.popen(*args)
    ws.wait_for_step(proc, 4)
    # The job's other processes: the ranks Lightning started, in the session of the one we launched.
    session = subprocess.run(["ps", "-o", "pid=", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    victims = [int(p) for p in session if int(p) != proc.pid]
    start = time.time()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    bound = RANK_TIMEOUT_S + RANK_MARGIN_S
    try:
        proc.wait(timeout=bound)
        ended = time.time() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        ended = None
    saved = ws.saved_step()
    rerun = ws.run(*args)
    resumed = "[runner] resuming" in rerun.stdout
    ok = (bool(victims) and ended is not None and proc.returncode != 0 and saved is not None and resumed
          and rerun.returncode == 0 and ws.done())
    if ok:
        happened = (f"rank 0 ended {ended:.0f} s later with an error (bound: timeout {RANK_TIMEOUT_S} s + "
                    f"{RANK_MARGIN_S} s); re-run resumed from step {saved} and finished")
    elif ended is None:
        happened = f"rank 0 still running {bound} s after rank 1 died (timeout {RANK_TIMEOUT_S} s): a hang"
    else:
        happened = f"victims {victims}, ended after {ended:.0f} s (exit {proc.returncode}), rerun: {last_error(rerun)}"
    return Outcome("one rank of two dies (SIGKILL)", happened,
                   f"none (the re-run resumed from last.ckpt of step {saved})" if ok else "?", ok)


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
    "unknown config key": config_fault("unknown config key", "unknown_config_key", ("optim.lrr=0.1",),
                                       ("optim.lrr", "command-line override"), over_a_run=True),
    "missing model path": config_fault("missing model path", "missing_model_path",
                                       ("model.llm.from_config=null", "model.llm.pretrained=./no/such/llm"),
                                       ("model.llm.pretrained", "does not exist"), over_a_run=False),
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
