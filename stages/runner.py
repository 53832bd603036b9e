"""The stage runner: runs a pipeline's stages in order, each into its own stage directory.

``runs/<pipeline>/<stage>/`` holds ``config.yaml`` (resolved), ``checkpoints/last.ckpt`` (full
Lightning state, trainable weights only), ``model/`` (exported trainable weights + the ids of the
frozen parts), ``metrics.json``, ``progress.json``, TensorBoard logs under ``tb/`` and ``DONE``.

Re-running the same command skips finished stages, refuses (clearly) to reuse a stage directory
whose config changed unless told to ``--redo``, and resumes an unfinished stage from ``last.ckpt``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf

from speechllm.config import ConfigError, StageConfig, load_pipeline, load_stage_config, stage_layers, to_yaml

# Changing these does not change what a stage computes, so a resume may change them.
RESUME_SAFE_KEYS = ("trainer.num_threads", "data.num_workers", "trainer.log_every_n_steps",
                    "trainer.devices", "trainer.num_nodes", "trainer.accelerator", "trainer.strategy")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, then rename: a kill while saving never breaks ``last.ckpt``.

    After each complete ``last.ckpt`` it records the step in ``progress.json`` (so ``status`` needs no
    checkpoint loading, and a step there always has its checkpoint on disk).
    """

    def __init__(self, progress: Path | None = None, max_steps: int | None = None):
        super().__init__()
        self.progress, self.max_steps = progress, max_steps

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:  # a full disk, a quota, a file-size limit
            tmp.unlink(missing_ok=True)
            last = path.with_name("last.ckpt")
            previous = "the previous last.ckpt is intact" if last.exists() else "no last.ckpt was written yet"
            raise OSError(err.errno, f"could not write checkpoint {path} ({err.strerror or err}); {previous}") from err
        os.replace(tmp, path)
        if self.progress is not None and path.name == "last.ckpt":
            data = {"step": checkpoint["global_step"], "max_steps": self.max_steps, "time": time.time()}
            tmp = self.progress.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(self.progress)


class StepTimer(L.Callback):
    """Mean wall time of a training step (validation excluded) in this process."""

    def __init__(self):
        self.total, self.count, self._start = 0.0, 0, 0.0

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.total += time.perf_counter() - self._start
        self.count += 1

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


class StepLogsSurviveKill(L.Callback):
    """Keep TensorBoard curves whole across a SIGKILL and resume.

    Lightning writes a step's ``self.log`` metrics after that step's checkpoint, so a kill in between
    would leave the step missing forever (the resumed run starts after it). The checkpoint carries
    those metrics and the resumed run logs them again; TensorBoard keeps the later copy of a step.
    It reads Lightning's own step bookkeeping (private attributes, no public equivalent): a Lightning
    upgrade that moves them fails ``test_sigkill_then_rerun_resumes_exactly``.
    """

    def __init__(self):
        self.pending: dict[str, Any] | None = None

    def on_train_batch_start(self, *args) -> None:
        self.pending = None

    def on_train_batch_end(self, trainer, *args) -> None:
        # Runs before ModelCheckpoint's hook (Lightning orders checkpoint callbacks last).
        connector = trainer._logger_connector
        if trainer.fit_loop._should_accumulate() or not connector.should_update_logs or not trainer.loggers:
            return
        metrics = {k: float(v) for k, v in connector.metrics["log"].items()}
        self.pending = {"step": trainer.fit_loop.epoch_loop._batches_that_stepped,
                        "metrics": {**metrics, "epoch": trainer.current_epoch}}

    def on_validation_start(self, *args) -> None:
        self.pending = None  # validation runs after the step's metrics were logged

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = state_dict.get("pending")

    def on_train_start(self, trainer, *args) -> None:
        if self.pending:
            for logger in trainer.loggers:
                logger.log_metrics(self.pending["metrics"], step=self.pending["step"])
                logger.save()
        self.pending = None


@dataclass
class StageDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def last_ckpt(self) -> Path:
        return self.root / "checkpoints" / "last.ckpt"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def done(self) -> Path:
        return self.root / "DONE"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def initial_metrics(self) -> Path:
        return self.root / "initial_metrics.json"


def _config_diff(old_yaml: str, new_cfg: StageConfig) -> list[str]:
    old = OmegaConf.to_container(OmegaConf.create(old_yaml), resolve=True)
    new = OmegaConf.to_container(new_cfg, resolve=True)

    def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out = {}
            for k, v in d.items():
                out.update(flatten(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUME_SAFE_KEYS)]


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX), where a bf16 autocast pays off
    (1.37x per stage-1 step on the 2-core machine, `bench levers`); without them it is emulated and slower."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: stay in float32
            return False
    return any(flag in ("avx512_bf16", "amx_bf16") for flag in cpuinfo.split())


def resolve_precision(name: str, accelerator: str = "auto", cpuinfo: str | None = None) -> str:
    """``auto``: bf16-mixed on a bf16 GPU, or on a CPU with bf16 instructions; float32 otherwise."""
    if name != "auto":
        return name
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if accelerator in ("auto", "cpu") and cpu_has_native_bf16(cpuinfo) else "32-true"


def is_rank_zero() -> bool:
    """Whether this process is the job's first (from the launcher's environment: Lightning, torchrun,
    SLURM): only it writes run-directory state."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    return (_get_rank() or 0) == 0 and os.environ.get("NODE_RANK", "0") == "0"


def build_strategy(cfg: StageConfig, module):
    """DDP (default for several devices) or FSDP, with a bounded collective timeout: a rank that dies
    ends the others within ``trainer.collective_timeout_s`` instead of hanging them."""
    t = cfg.trainer
    devices = t.devices if isinstance(t.devices, int) else (torch.cuda.device_count() if t.devices in ("auto", -1) else len(t.devices))
    several = (devices or 1) > 1 or t.num_nodes > 1
    timeout = timedelta(seconds=t.collective_timeout_s)
    # A batch of plain text (SALAD's text share) leaves the projector unused on that step.
    unused = any(src.kind == "text" for src in cfg.data.sources.values())
    if t.strategy == "ddp" or (t.strategy == "auto" and several):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=unused, timeout=timeout)
    if t.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        # Shard by decoder layer; use_orig_params keeps frozen and trained weights in one module.
        layer = type(module.model.llm.get_decoder().layers[0])
        return FSDPStrategy(auto_wrap_policy={layer}, use_orig_params=True, timeout=timeout)
    return t.strategy


def build_trainer(cfg: StageConfig, stage_dir: StageDir, module) -> L.Trainer:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    # The frozen encoder and LLM stay in eval mode on purpose (no dropout, a valid prefix cache):
    # Lightning's warning about it would greet every run.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    t = cfg.trainer
    checkpoint = ModelCheckpoint(
        dirpath=stage_dir.root / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps, save_last=True,
        save_top_k=t.keep_last_checkpoints, monitor="step", mode="max",
    )
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(cfg, module),
        precision=resolve_precision(t.precision, t.accelerator), max_steps=t.max_steps, max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=t.gradient_clip_val or None,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=0,
        # The data module shards every loader itself (resumable batch streams, padded eval sets).
        use_distributed_sampler=False,
        logger=TensorBoardLogger(str(stage_dir.root), name="tb", version=""),
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step"), StepTimer(), StepLogsSurviveKill()],
        plugins=[AtomicCheckpointIO(stage_dir.progress, t.max_steps)], default_root_dir=str(stage_dir.root), enable_model_summary=False,
    )


# What a stage trains on when `data.train` is given without named sources.
DEFAULT_SOURCE_KIND = {"align": "simulated", "asr": "speech", "distill": "speech", "select": "speech"}


def build_datamodule(cfg: StageConfig, module):
    from datamodules.speech_text import SpeechTextDataModule

    datamodule = SpeechTextDataModule(cfg, DEFAULT_SOURCE_KIND[cfg.kind], tokenizer=module.model.tokenizer)
    for name, src in datamodule.source_configs().items():
        if src.kind not in module.source_kinds:
            raise ConfigError(f"data.sources.{name}: stage kind {cfg.kind!r} trains on {module.source_kinds}, "
                              f"not {src.kind!r}")
    return datamodule


def has_validation(cfg: StageConfig) -> bool:
    """Validation runs WER sets and the held-out measures (M/F, multiple choice)."""
    return bool(cfg.data.val or cfg.measures.sets or cfg.measures.multiple_choice)


def evaluate(trainer: L.Trainer, module, datamodule, cfg: StageConfig, both: bool = False) -> dict[str, float]:
    """WER on the test sets (and the validation sets if ``both``, or if there are no test sets)."""
    out: dict[str, float] = {}
    if has_validation(cfg) and (both or not cfg.data.test):
        for per_loader in trainer.validate(module, datamodule=datamodule, verbose=False):
            out.update(per_loader)
    if cfg.data.test:
        for per_loader in trainer.test(module, datamodule=datamodule, verbose=False):
            out.update(per_loader)
    return {k: float(v) for k, v in out.items()}


def run_stage(cfg: StageConfig, stage_dir: StageDir) -> dict[str, Any]:
    """Train one stage (resuming from ``last.ckpt`` if present), export, evaluate, mark DONE."""
    from lightning_modules import STAGE_MODULES

    if cfg.kind not in STAGE_MODULES:
        raise ConfigError(f"stage kind {cfg.kind!r} is not available (have: {sorted(STAGE_MODULES)})")
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    start = time.time()
    module = STAGE_MODULES[cfg.kind](cfg, stage_dir.root)
    datamodule = build_datamodule(cfg, module)
    datamodule.check_sources()
    trainer = build_trainer(cfg, stage_dir, module)
    resume = stage_dir.last_ckpt if stage_dir.last_ckpt.is_file() else None
    if resume and trainer.is_global_zero:
        print(f"[runner] resuming {stage_dir.root} from {resume}", flush=True)
    if resume is None and cfg.trainer.evaluate_before_training and (cfg.data.test or has_validation(cfg)):
        # The starting point's WER (e.g. the untrained projector), logged at step 0 and kept.
        initial = evaluate(trainer, module, datamodule, cfg)
        if trainer.is_global_zero:
            stage_dir.initial_metrics.write_text(json.dumps(initial, indent=1))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    train_loss = trainer.callback_metrics.get("train/loss")
    final = evaluate(trainer, module, datamodule, cfg, both=True)

    initial = json.loads(stage_dir.initial_metrics.read_text()) if stage_dir.initial_metrics.is_file() else {}
    metrics = {
        "stage": stage_dir.root.name, "kind": cfg.kind, "steps": trainer.global_step, "precision": str(trainer.precision),
        **{f"initial/{k}": v for k, v in initial.items()},
        "train_loss_last": float(train_loss) if train_loss is not None else None,
        "wall_time_s_this_run": round(time.time() - start, 1),
        "train_step_s_mean": next((c.mean for c in trainer.callbacks if isinstance(c, StepTimer)), None),
        **(loss_curve(stage_dir.root / "tb") if trainer.is_global_zero else {}),
        **final,
        **{f"skipped/{k}": v for k, v in getattr(datamodule, "skipped", {}).items()},
        **{f"skipped/{k}": v for k, v in module.counters.items()},
    }
    if trainer.is_global_zero:
        module.model.save_pretrained(stage_dir.model)
        stage_dir.metrics.write_text(json.dumps(metrics, indent=1))
        stage_dir.done.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    # The other ranks go on to the next stage only once this one's export is on disk.
    trainer.strategy.barrier("stage exported")
    return metrics


def scalar_series(path: Path, tag: str = "train/loss") -> dict[int, float]:
    """A logged scalar by step, from a TensorBoard directory or one event file ({} if never logged).
    A resumed run re-logs steps; TensorBoard keeps the later value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}


def loss_curve(tb_dir: Path, tag: str = "train/loss", points: int = 11) -> dict[str, float]:
    """First/last values of a logged scalar and a few evenly spaced points (for reports)."""
    values = scalar_series(tb_dir, tag)
    if not values:
        return {}
    steps = sorted(values)
    tail = [values[s] for s in steps[-10:] if math.isfinite(values[s])]  # skipped NaN steps do not count
    picks = sorted({steps[round(i * (len(steps) - 1) / (points - 1))] for i in range(points)})
    return {"train_loss_first": values[steps[0]], "train_loss_last10_mean": sum(tail) / len(tail) if tail else float("nan"),
            "train_loss_curve": {str(s): round(values[s], 4) for s in picks}}


def resolve_stage_configs(pipeline_path: str | Path, overrides: list[str], run_dir: str | None = None,
                          scale: str | None = None):
    """``(name, StageDir, config)`` for every stage of a pipeline, in order."""
    pipeline = load_pipeline(pipeline_path, scale)
    root = Path(run_dir or pipeline.run_dir) / pipeline.name
    out = []
    for stage in pipeline.stages:
        cfg = load_stage_config(stage_layers(pipeline_path, pipeline, stage.name, scale), overrides)
        if cfg.init_from and "/" not in cfg.init_from:  # a stage name: that stage's exported model
            cfg.init_from = str(root / cfg.init_from / "model")
        out.append((stage.name, StageDir(root / stage.name), cfg))
    return out


def run_pipeline(pipeline_path: str | Path, overrides: list[str] | None = None, only: list[str] | None = None,
                 redo: bool = False, run_dir: str | None = None, scale: str | None = None) -> dict[str, dict]:
    stages = resolve_stage_configs(pipeline_path, overrides or [], run_dir, scale)
    unknown = set(only or []) - {name for name, _, _ in stages}
    if unknown:
        raise ConfigError(f"{pipeline_path}: no stage named {sorted(unknown)} (have {[n for n, _, _ in stages]})")
    results = {}
    rank_zero = is_rank_zero()
    for name, stage_dir, cfg in stages:
        if only and name not in only:
            continue
        if not cfg.enabled:
            print(f"[runner] stage {name!r} is disabled at this scale; skipping", flush=True)
            continue
        # Every rank checks (read-only); only rank zero clears or writes. Under --redo the others
        # skip the check: rank zero is clearing what they would be comparing against.
        if stage_dir.config.is_file() and (rank_zero or not redo):
            changed = _config_diff(stage_dir.config.read_text(), cfg)
            if changed and not redo:
                raise ConfigError(
                    f"stage {name!r}: {stage_dir.root} was run with a different config (changed: "
                    f"{', '.join(changed[:8])}). Re-run with --redo to start this stage over, or use another --run-dir."
                )
            if rank_zero and (changed or (redo and only and name in only)):
                print(f"[runner] --redo: clearing {stage_dir.root}", flush=True)
                shutil.rmtree(stage_dir.root)
        if stage_dir.done.is_file():
            print(f"[runner] stage {name!r} is DONE ({stage_dir.root}); skipping", flush=True)
            results[name] = json.loads(stage_dir.metrics.read_text()) if stage_dir.metrics.is_file() else {}
            continue
        if cfg.init_from and not (Path(cfg.init_from) / "trainable.safetensors").is_file():
            raise ConfigError(f"stage {name!r}: init_from {cfg.init_from} has no exported model (run the earlier stage first)")
        if rank_zero:
            stage_dir.root.mkdir(parents=True, exist_ok=True)
            if not stage_dir.config.is_file():
                stage_dir.config.write_text(to_yaml(cfg))
            print(f"[runner] running stage {name!r} ({cfg.kind}) into {stage_dir.root}", flush=True)
        results[name] = run_stage(cfg, stage_dir)
    return results


def pipeline_status(pipeline_path: str | Path, overrides: list[str] | None = None, run_dir: str | None = None,
                    scale: str | None = None) -> list[dict]:
    rows = []
    for name, stage_dir, cfg in resolve_stage_configs(pipeline_path, overrides or [], run_dir, scale):
        row = {"stage": name, "kind": cfg.kind, "dir": str(stage_dir.root)}
        if not cfg.enabled:
            row["state"] = "disabled at this scale"
        elif stage_dir.done.is_file():
            row["state"] = "done"
            if stage_dir.metrics.is_file():
                row["metrics"] = json.loads(stage_dir.metrics.read_text())
        elif stage_dir.progress.is_file():
            progress = json.loads(stage_dir.progress.read_text())
            row["state"] = f"stopped/running at step {progress['step']}/{progress['max_steps']}"
        elif stage_dir.config.is_file():
            row["state"] = "started, no checkpoint yet"
        else:
            row["state"] = "not started"
        if stage_dir.config.is_file() and _config_diff(stage_dir.config.read_text(), cfg):
            row["state"] += " (config changed since: needs --redo)"
        rows.append(row)
    return rows
