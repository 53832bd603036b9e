"""Lightning's step overhead against a bare PyTorch loop, on CPU, one thread (numbers to read, never asserted).

``python -m stages bench overhead`` (or ``python -m stages.bench_overhead [--blocks 5] [--steps 10]``): one
stage-1 model (the tiny preset's CTC text side, a small from-config LLM with LoRA r 16, so that a step
takes ~0.1 s of CPU) and one pre-built batch, trained four ways on the same weights:

- ``bare PyTorch``: the computation of ``AlignModule.training_step`` (text side, forward, loss), backward,
  gradient clipping, AdamW, the LR schedule, from the same loader; nothing else.
- ``Lightning, bare L.Trainer``: the real ``AlignModule`` in an ``L.Trainer`` with the same precision,
  clipping and TensorBoard logging every ``log_every_n_steps`` (5, as the demo), no checkpointing, no
  progress bar, no validation.
- ``Lightning, project trainer``: ``stages.trainer.build_trainer`` as a real run builds it (its logger,
  LR monitor, checkpoint callback, StepTimer, StepLogsSurviveKill, atomic checkpoint I/O, progress bar);
  no checkpoint falls due within a block (writing one is a separate, periodic cost).
- ``Lightning, bare L.Trainer, self.log off``: the second with the module's ``self.log`` a no-op: what
  the module's per-step scalars cost (Lightning's ``self.log`` does a fixed amount of work per call).

Both Lightning loops with logging also run the module's other hooks (per-step seeding, the NaN/inf
gradient check): all that a real run pays beyond the bare loop. Each of ``--blocks`` rounds runs every
loop once, in a rotated order (noise and drift of a shared machine fall on all alike): a fresh optimizer,
``--warmup`` untimed steps, then ``--steps`` timed ones. Wall and CPU seconds per step are both
reported: the process's CPU time hardly moves when other jobs share the cores. A loop's figure is the
median of its blocks, its ratio to the bare loop the median of the per-block ratios. Prints a table,
writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

BARE = "bare PyTorch"
LIGHTNING = "Lightning, bare L.Trainer"
PROJECT = "Lightning, project trainer (build_trainer)"
UNLOGGED = "Lightning, bare L.Trainer, self.log off"
# A stage-1 LLM big enough that a step is ~0.1 s on one thread, small enough to build in seconds.
SMALL_LLM = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
             "tie_word_embeddings": True}
LOG_EVERY_N_STEPS = 5  # the demo pipeline's


def build(batch_size: int, target_chars: int, warmup: int, steps: int):
    """The AlignModule and its batch (stages.bench_gpu's text batch)."""
    from omegaconf import OmegaConf

    from lightning_modules import AlignModule
    from speechllm.config import load_stage_config
    from stages.bench_gpu import REPO, TINY, stage_batch

    preset = OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml"))
    cfg = load_stage_config([("configs/model/tiny.yaml", preset), ("configs/stage/align.yaml", REPO / "configs/stage/align.yaml"),
                             ("bench overhead", {
                                 "model": {"llm": {"from_config": SMALL_LLM, "lora": {"enabled": True}}},
                                 "trainer": {"accelerator": "cpu", "max_steps": warmup + steps,
                                             "log_every_n_steps": LOG_EVERY_N_STEPS,
                                             "checkpoint_every_n_steps": 10**6}})])
    module = AlignModule(cfg)
    return module, stage_batch("align", dataclasses.replace(TINY, batch_size=batch_size, target_tokens=target_chars))


def precision_of(cfg) -> str:
    from stages.trainer import resolve_precision

    return resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds now; CPU: the process's, every thread (the logger's writer too)."""
    return time.perf_counter(), time.process_time()


def per_step(start: tuple[float, float], end: tuple[float, float], steps: int) -> tuple[float, float]:
    return (end[0] - start[0]) / steps, (end[1] - start[1]) / steps


def bare_block(module, batch: dict, warmup: int, steps: int, workdir: Path) -> tuple[float, float]:
    """(wall, CPU) seconds per step of the bare loop: the same computation, optimizer and schedule, no Lightning."""
    import torch

    from stages.bench_gpu import repeated

    model, cfg = module.model, module.cfg
    optimizers = module.configure_optimizers()
    optimizer, schedule = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision_of(cfg) == "bf16-mixed")
    batches = iter(repeated(batch))
    module.train()
    for i in range(warmup + steps):
        if i == warmup:
            start = clock()
        b = next(batches)
        with autocast:
            feats, lengths = model.encoder.encode_text(b["text"], module.sample_generators(b))
            out = model(feats, lengths, model.target_ids(b["target"]))
            # as finish_step: the projector tied into the graph
            loss = out["loss"] + sum(p.sum() for p in model.projector.parameters()) * 0.0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return per_step(start, clock(), steps)


def _block_timer(warmup: int):
    """A callback timing the steps after the warm-up, end of step to end of step (so each interval holds
    everything Lightning does between two steps, every callback included)."""
    import lightning as L

    class BlockTimer(L.Callback):
        def __init__(self):
            self.start = self.end = None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.end = clock()
            if batch_idx == warmup - 1:
                self.start = self.end

    return BlockTimer()


def bare_trainer(cfg, workdir: Path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    t = cfg.trainer
    return L.Trainer(accelerator=t.accelerator, devices=1, precision=precision_of(cfg), max_steps=t.max_steps,
                     max_epochs=-1, gradient_clip_val=t.gradient_clip_val or None, log_every_n_steps=t.log_every_n_steps,
                     logger=TensorBoardLogger(str(workdir), name="tb", version=""), enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)


def project_trainer(cfg, workdir: Path):
    from stages.trainer import build_trainer

    return build_trainer(cfg, workdir, workdir / "progress.json")


def lightning_block(make_trainer, log: bool = True):
    """A block runner that fits the module with the trainer ``make_trainer(cfg, workdir)`` builds;
    ``log=False`` turns the module's ``self.log`` into a no-op for the block (what logging costs)."""
    from stages.bench_gpu import repeated

    def block(module, batch: dict, warmup: int, steps: int, workdir: Path) -> tuple[float, float]:
        timer = _block_timer(warmup)
        trainer = make_trainer(module.cfg, workdir)
        trainer.callbacks.append(timer)  # after every other callback: each interval holds all of them
        if not log:
            module.log = lambda *args, **kwargs: None
        try:
            trainer.fit(module, train_dataloaders=repeated(batch))
        finally:
            module.__dict__.pop("log", None)
        return per_step(timer.start, timer.end, steps)

    return block


LOOPS = {BARE: bare_block, LIGHTNING: lightning_block(bare_trainer), PROJECT: lightning_block(project_trainer),
         UNLOGGED: lightning_block(bare_trainer, log=False)}


def measure(blocks: int, warmup: int, steps: int, batch_size: int, target_chars: int) -> dict:
    """Wall and CPU seconds per step of every loop in every block, their medians and the ratios to the bare loop."""
    module, batch = build(batch_size, target_chars, warmup, steps)
    names = list(LOOPS)
    per_block: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for b in range(blocks):
            for j in range(len(names)):
                name = names[(b + j) % len(names)]  # rotated: each loop takes each place in the order in turn
                print(f"[bench overhead] block {b + 1}/{blocks}: {name}", flush=True)
                per_block[name].append(LOOPS[name](module, batch, warmup, steps, Path(tmp) / f"{b}-{j}"))
    result = {"precision": precision_of(module.cfg)}
    for i, kind in enumerate(("wall", "cpu")):
        seconds = {name: [block[i] for block in v] for name, v in per_block.items()}
        ratios = {name: [s / bare for s, bare in zip(seconds[name], seconds[BARE])] for name in names if name != BARE}
        # The added time is what a loop costs whatever the step: the ratio at another step size follows from it.
        added = {name: [1e3 * (s - bare) for s, bare in zip(seconds[name], seconds[BARE])] for name in names if name != BARE}
        result[kind] = {"s_per_step": {name: statistics.median(v) for name, v in seconds.items()},
                        "ratio_to_bare": {name: statistics.median(v) for name, v in ratios.items()},
                        "added_ms_per_step": {name: statistics.median(v) for name, v in added.items()},
                        "s_per_step_blocks": seconds, "ratio_to_bare_blocks": ratios}
    return result


def print_table(result: dict, settings: dict) -> None:
    print(f"\nLightning overhead on CPU, 1 thread, {result['precision']}: {settings['blocks']} blocks of "
          f"{settings['warmup']} + {settings['steps']} steps, batch {settings['batch_size']} (medians of the blocks)")
    print(f"{'loop':<44} {'wall s/step':>11} {'x bare':>7} {'(blocks)':>13} {'+ms/step':>8} "
          f"{'CPU s/step':>11} {'x bare':>7} {'(blocks)':>13} {'+ms/step':>8}")
    for name in result["wall"]["s_per_step"]:
        cells = []
        for kind in ("wall", "cpu"):
            ratios = result[kind]["ratio_to_bare_blocks"].get(name)
            added = result[kind]["added_ms_per_step"].get(name)
            cells.append(f"{result[kind]['s_per_step'][name]:>11.4f} {result[kind]['ratio_to_bare'].get(name, 1.0):>7.3f} "
                         f"{f'{min(ratios):.2f}-{max(ratios):.2f}' if ratios else '':>13} "
                         f"{f'{added:+.1f}' if added is not None else '':>8}")
        print(f"{name:<44} {' '.join(cells)}")
    print("target: Lightning <= 1.05 x bare")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.bench_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=5, help="rounds of the four loops (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop and block (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop and block (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per step (default: %(default)s)")
    parser.add_argument("--target-chars", type=int, default=40,
                        help="characters (tokens of the character tokenizer) per target (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/overhead.json"))
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.blocks < 1:
        parser.error("--blocks, --warmup and --steps must be >= 1")
    import lightning  # noqa: F401  (its logger is set up on import: quieted below)
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|module\(s\) in eval mode|LeafSpec).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result = measure(args.blocks, args.warmup, args.steps, args.batch_size, args.target_chars)
    print_table(result, settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, **result}, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
