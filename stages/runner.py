"""The stage runner: runs a pipeline's stages in order, each into its own stage directory
(``stages.stage_dir``).

Every stage of the pipeline is resolved and validated before the first one starts. Re-running the
same command skips finished stages, resumes an unfinished one from ``last.ckpt``, and refuses to
continue a stage directory whose config changed what the stage computes, naming the keys; ``--redo``
then moves the directory aside (a finished stage only with ``--force``), never deleting it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from speechllm.config import (
    ConfigError,
    StageConfig,
    load_pipeline,
    load_stage_config,
    missing_model_paths,
    stage_layers,
)
from speechllm.io import atomic_write
from stages.callbacks import LastValidation, StepTimer
from stages.stage_dir import StageDir, config_diff
from stages.tensorboard import loss_curve
from stages.trainer import build_trainer, is_rank_zero
from stages.validation import validate_stage


def build_datamodule(cfg: StageConfig, module):
    from datamodules.speech_text import SpeechTextDataModule

    return SpeechTextDataModule(cfg, module.source_kinds[0], tokenizer=module.model.tokenizer)


def has_validation(cfg: StageConfig) -> bool:
    """Validation runs WER sets and the held-out measures (M/F, multiple choice)."""
    return bool(cfg.data.val or cfg.measures.sets or cfg.measures.multiple_choice)


def evaluate(trainer: L.Trainer, module, datamodule, cfg: StageConfig, *, validation: bool = True,
             test: bool = True) -> dict[str, float]:
    """The validation sets (WER, held-out measures) and the test sets (WER), those asked for that exist."""
    out: dict[str, float] = {}
    if validation and has_validation(cfg):
        for per_loader in trainer.validate(module, datamodule=datamodule, verbose=False):
            out.update(per_loader)
    if test and cfg.data.test:
        for per_loader in trainer.test(module, datamodule=datamodule, verbose=False):
            out.update(per_loader)
    return {k: float(v) for k, v in out.items()}


def evaluate_starting_point(trainer: L.Trainer, module, datamodule, cfg: StageConfig) -> dict[str, float]:
    """Before training: the test sets (e.g. the untrained projector's WER), or, in a stage with held-out
    measures (M, F, multiple choice), those alone: such a stage starts from an earlier stage's export,
    whose test WER that stage already reported."""
    measures = bool(cfg.measures.sets or cfg.measures.multiple_choice)
    return evaluate(trainer, module, datamodule, cfg, validation=measures or not cfg.data.test, test=not measures)


def run_stage(cfg: StageConfig, stage_dir: StageDir) -> dict[str, Any]:
    """Train one stage (resuming from ``last.ckpt`` if present), export, evaluate, mark DONE."""
    from lightning_modules import STAGE_KINDS

    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    start = time.time()
    module = STAGE_KINDS[cfg.kind](cfg, stage_dir.root)
    datamodule = build_datamodule(cfg, module)
    datamodule.check_sources()
    trainer = build_trainer(cfg, stage_dir.root, stage_dir.progress)
    resume = stage_dir.last_ckpt if stage_dir.last_ckpt.is_file() else None
    if resume and trainer.is_global_zero:
        print(f"[runner] resuming {stage_dir.root} from {resume}", flush=True)
    if resume is None and cfg.trainer.evaluate_before_training and (cfg.data.test or has_validation(cfg)):
        # The starting point's WER (e.g. the untrained projector), logged at step 0 and kept.
        initial = evaluate_starting_point(trainer, module, datamodule, cfg)
        if trainer.is_global_zero:
            atomic_write(stage_dir.initial_metrics, json.dumps(initial, indent=1))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    train_loss = trainer.callback_metrics.get("train/loss")
    # A validation at the final step inside fit already measured these weights: its metrics stand.
    last = next(c for c in trainer.callbacks if isinstance(c, LastValidation))
    validated = last.step == trainer.global_step and bool(last.metrics)
    final = {**(last.metrics if validated else {}), **evaluate(trainer, module, datamodule, cfg, validation=not validated)}

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
    trainable = module.trained_weights()  # (under FSDP a gather: every rank takes part)
    if trainer.is_global_zero:
        module.model.save_pretrained(stage_dir.model, metrics=metrics, trainable=trainable)  # the card shows them
        atomic_write(stage_dir.metrics, json.dumps(metrics, indent=1))
        atomic_write(stage_dir.done, time.strftime("%Y-%m-%d %H:%M:%S\n"))
    # The other ranks go on to the next stage only once this one's export is on disk.
    trainer.strategy.barrier("stage exported")
    return metrics


def resolve_stage_configs(pipeline_path: str | Path, overrides: list[str], run_dir: str | None = None,
                          scale: str | None = None):
    """``(name, StageDir, config)`` for every stage of a pipeline, in order, each enabled one validated."""
    pipeline = load_pipeline(pipeline_path, scale)
    root = Path(run_dir or pipeline.run_dir) / pipeline.name
    out = []
    for stage in pipeline.stages:
        layers = stage_layers(pipeline_path, pipeline, stage.name, scale)
        cfg = load_stage_config(layers, overrides)
        if cfg.enabled:
            validate_stage(stage.name, cfg, layers, overrides)
        if cfg.init_from and "/" not in cfg.init_from:  # a stage name: that stage's exported model
            cfg.init_from = str(root / cfg.init_from / "model")
        out.append((stage.name, StageDir(root / stage.name), cfg))
    return out


def changed_keys(stage_dir: StageDir, cfg: StageConfig) -> list[str]:
    """What in ``cfg`` would change the computation of the run in ``stage_dir`` (see ``config_diff``)."""
    from lightning_modules import STAGE_KINDS

    specific = {s for kind in STAGE_KINDS.values() for s in kind.config_sections}
    read = STAGE_KINDS[cfg.kind].sections_read(cfg) if cfg.kind in STAGE_KINDS else specific
    return config_diff(stage_dir.config.read_text(), cfg, tuple(sorted(specific - set(read))))


def run_pipeline(pipeline_path: str | Path, overrides: list[str] | None = None, only: list[str] | None = None,
                 redo: bool = False, run_dir: str | None = None, scale: str | None = None,
                 force: bool = False) -> dict[str, dict]:
    """Run (or resume) the stages in order. ``redo`` starts over the ``only`` stages and any whose config
    changed, moving their directories aside; a DONE stage is moved aside only with ``force``."""
    stages = resolve_stage_configs(pipeline_path, overrides or [], run_dir, scale)
    unknown = set(only or []) - {name for name, _, _ in stages}
    if unknown:
        raise ConfigError(f"{pipeline_path}: no stage named {sorted(unknown)} (have {[n for n, _, _ in stages]})")
    # The models of every stage that is about to run must be there before the first one starts (and
    # before its run directory is written), so fixing a path never meets a half-started stage.
    missing = [f"stage {name!r}: {key}: {problem}" for name, stage_dir, cfg in stages
               if (not only or name in only) and cfg.enabled and not stage_dir.done.is_file()
               for key, problem in missing_model_paths(cfg.model)]
    if missing:
        raise ConfigError("\n".join(missing))
    results = {}
    rank_zero = is_rank_zero()
    for name, stage_dir, cfg in stages:
        if only and name not in only:
            continue
        if not cfg.enabled:
            print(f"[runner] stage {name!r} is disabled at this scale; skipping", flush=True)
            continue
        # Every rank checks (read-only); only rank zero moves or writes. Under --redo the others skip
        # the check: rank zero is moving aside what they would be comparing against.
        if stage_dir.config.is_file() and (rank_zero or not redo):
            changed = changed_keys(stage_dir, cfg)
            done = stage_dir.done.is_file()
            remedy = "--redo --force (a finished stage" if done else "--redo (the stage"
            if changed and not redo:
                raise ConfigError(
                    f"stage {name!r}: {stage_dir.root} was run with a different config; changed:\n  "
                    + "\n  ".join(changed[:12]) + f"\nRe-run with {remedy} is moved aside, not deleted) to start "
                    "it over, or use another --run-dir.")
            if changed or (redo and only and name in only):
                if done and not force:
                    raise ConfigError(f"stage {name!r} is DONE ({stage_dir.root}): --redo would start a finished stage "
                                      "over; add --force to move it aside (it is kept, renamed) and run it again")
                if rank_zero:
                    print(f"[runner] --redo: moved {stage_dir.root} aside to {stage_dir.move_aside()}", flush=True)
        if stage_dir.done.is_file():
            print(f"[runner] stage {name!r} is DONE ({stage_dir.root}); skipping", flush=True)
            results[name] = json.loads(stage_dir.metrics.read_text()) if stage_dir.metrics.is_file() else {}
            continue
        if cfg.init_from and not (Path(cfg.init_from) / "trainable.safetensors").is_file():
            raise ConfigError(f"stage {name!r}: init_from {cfg.init_from} has no exported model (run the earlier stage first)")
        if rank_zero:
            stage_dir.root.mkdir(parents=True, exist_ok=True)
            if not stage_dir.config.is_file():
                stage_dir.write_config(cfg)
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
        if stage_dir.config.is_file() and changed_keys(stage_dir, cfg):
            row["state"] += " (config changed since: needs --redo)"
        rows.append(row)
    return rows
