"""Benchmarks that compare configurations in one run (these machines are noisy: read ratios).

``python -m stages bench levers``: the stage-1 levers of the embedded default, each a short run of the
``align`` stage with one override (seconds per step, LLM tokens/s, loss after N steps).
``python -m stages bench distill``: step time of stage 3 with distillation (alpha 1: a teacher forward
too) against NLL (alpha 0), on the embedded default.
``python -m stages bench memory``: peak memory of the chunked vs unchunked loss at 49k and 152k
vocabularies (:mod:`stages.bench_memory`).
``python -m stages bench overhead``: Lightning's step overhead against a bare PyTorch loop on the same
model and batch, on CPU (:mod:`stages.bench_overhead`).
``python -m stages bench padding``: the padding share of each stage's LLM batches and padded vs packed
step time (:mod:`stages.bench_padding`; it needs the demo data).
``python -m stages bench gpu``: stages 1-3 at Qwen2.5-1.5B / Whisper-small shapes on one CUDA device
(tokens/s, peak memory, MFU; packed, fused-loss and checkpointed variants), then every stage of
``--pipeline`` once on it (:mod:`stages.bench_gpu`; ``--device cpu --tiny`` checks the code path).
``python -m stages bench all``: the CPU set: levers, distill, memory and overhead. Results go to
``<out>/*.json`` and printed tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from stages.tensorboard import loss_curve, scalar_series

LEVERS: dict[str, list[str]] = {
    # precision auto: bf16-mixed on a CPU with bf16 instructions, float32 elsewhere; both are measured.
    "baseline (the demo default: unit lookup, LoRA r16, short prompt, precision auto, 2 threads)": [],
    "default system prompt": ["model.prompt.system_prompt=null"],
    "float32": ["trainer.precision=32-true"],
    "bf16 autocast": ["trainer.precision=bf16-mixed"],
    "1 thread": ["trainer.num_threads=1"],
    "targets cut to 24 tokens": ["model.prompt.max_target_tokens=24"],
    "no matched CPS noise": ["model.encoder.text_side=cps"],
    # Prefix key/value reuse needs a frozen LLM: measured with LoRA off, with and without it.
    "LoRA off (frozen LLM, prompt prefix KV reused)": ["model.llm.lora.enabled=false"],
    "LoRA off, no prefix KV reuse": ["model.llm.lora.enabled=false", "model.prompt.cache_prefix=false"],
    "TASU MLP projector, lr 1e-3": ["model.projector.unit_lookup=false", "optim.lr=1e-3"],
    "MLP initialised from LLM embeddings, lr 1e-4": ["model.projector.unit_lookup=false",
                                                     "model.projector.init_from_llm_embeddings=true",
                                                     "model.projector.hidden_dim=2048"],
}
DISTILL: dict[str, list[str]] = {
    "NLL (alpha 0)": ["distill.alpha=0.0"],
    "distillation (alpha 1)": ["distill.alpha=1.0"],
}


def run_variants(pipeline: str, stage: str, variants: dict[str, list[str]], steps: int, out: Path,
                 extra: list[str], only: list[str] | None = None) -> list[dict]:
    """One short run of ``stage`` per variant, each in a fresh process, one after another."""
    rows = []
    common = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps + 1}", "trainer.num_threads=2",
              "trainer.evaluate_before_training=false", "data.val={}", "data.test={}", "measures.sets={}",
              "measures.multiple_choice={}", "optim.warmup_steps=5", "trainer.log_every_n_steps=1", *extra]
    for i, (name, overrides) in enumerate(variants.items()):
        if only and not any(o in name for o in only):
            continue
        run_dir = out / f"{stage}{i}"
        # A bench variant is a throwaway: an earlier bench's finished run of it is moved aside.
        cmd = [sys.executable, "-m", "stages", "run", pipeline, "--only", stage, "--run-dir", str(run_dir), "--redo", "--force",
               *common, *overrides]
        print(f"[bench] {stage}: {name}: {' '.join(overrides) or '(defaults)'}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"variant": name, "error": proc.stderr[-800:]})
            continue
        stage_dir = next(run_dir.glob(f"*/{stage}"))
        metrics = json.loads((stage_dir / "metrics.json").read_text())
        tokens = _mean_scalar(stage_dir / "tb", "train/llm_tokens_per_s")
        rows.append({"variant": name, "overrides": overrides, "s_per_step": metrics["train_step_s_mean"],
                     "llm_tokens_per_s": tokens, **loss_curve(stage_dir / "tb")})
    return rows


def _mean_scalar(tb_dir: Path, tag: str) -> float | None:
    series = scalar_series(tb_dir, tag)
    values = [series[step] for step in sorted(series)][1:]
    return sum(values) / len(values) if values else None


def print_table(rows: list[dict]) -> None:
    print(f"\n{'variant':<58} {'s/step':>7} {'tok/s':>7} {'loss@0':>7} {'loss@end':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<58} failed: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        print(f"{r['variant']:<58} {r['s_per_step']:>7.2f} {r['llm_tokens_per_s'] or 0:>7.0f} "
              f"{r.get('train_loss_first', float('nan')):>7.3f} {r.get('train_loss_last10_mean', float('nan')):>8.3f}")


WHAT = {
    "levers": "stage-1 levers",
    "distill": "distillation vs NLL step time",
    "memory": "chunked vs unchunked loss",
    "overhead": "Lightning vs a bare PyTorch loop (CPU)",
    "padding": "padding share of each stage's LLM batches, padded vs packed step time (needs the demo data)",
    "gpu": "stages 1-3 at 1.5B shapes on a CUDA device, then a pipeline once on it",
    "all": "the CPU set: levers, distill, memory, overhead",
}
CPU_SET = ("levers", "distill", "memory", "overhead")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stages import bench_gpu

    parser.add_argument("what", choices=list(WHAT), help="; ".join(f"{k}: {v}" for k, v in WHAT.items()))
    parser.add_argument("--pipeline", default="configs/pipeline/demo.yaml",
                        help="pipeline whose stages are measured (gpu: run once on the device, the tiny pipeline "
                             "when its data or assets are missing) (default: %(default)s)")
    parser.add_argument("--steps", type=int,
                        help="training steps per variant (default: levers/distill 30, gpu 10 timed, overhead its own)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"),
                        help="folder of the runs and *.json results (default: %(default)s)")
    parser.add_argument("--only", nargs="*", help="substrings of variant names to run (gpu: 'stage: variant')")
    bench_gpu.add_options(parser.add_argument_group("gpu"))


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = CPU_SET if args.what == "all" else (args.what,)
    steps = args.steps or 30
    if "levers" in chosen:
        rows = run_variants(args.pipeline, "align", LEVERS, steps, args.out, [], args.only)
        (args.out / "levers.json").write_text(json.dumps(rows, indent=1))
        print_table(rows)
    if "distill" in chosen:
        # From stage 3's own starting point, not a stage-2 export: the bench needs no earlier stage.
        rows = run_variants(args.pipeline, "distill", DISTILL, steps, args.out, ["init_from=null"], args.only)
        if len(rows) == 2 and all("s_per_step" in r for r in rows):
            rows.append({"distill_over_nll_step_time": rows[1]["s_per_step"] / rows[0]["s_per_step"]})
            print(f"\nstep time ratio distillation / NLL: {rows[-1]['distill_over_nll_step_time']:.2f}")
        (args.out / "distill.json").write_text(json.dumps(rows, indent=1))
        print_table([r for r in rows if "variant" in r])
    if "memory" in chosen:
        from stages import bench_memory

        bench_memory.main(["--out", str(args.out / "distill_memory.json")])
    if "overhead" in chosen:
        from stages import bench_overhead

        bench_overhead.main(["--out", str(args.out / "overhead.json"), *(["--steps", str(args.steps)] if args.steps else [])])
    if "padding" in chosen:  # each bench module is imported only when chosen: a broken one fails only its bench
        from stages import bench_padding

        return bench_padding.main(["--pipeline", args.pipeline, "--out", str(args.out / "padding.json")])
    if "gpu" in chosen:
        from stages import bench_gpu

        return bench_gpu.run(args)
    return 0
