"""Benchmarks that compare configurations in one run (these machines are noisy: read ratios).

``python -m stages bench levers``: the stage-1 levers of the embedded default, each a short run of
the ``align`` stage with one override, reporting seconds per step, LLM tokens/s and the loss after
N steps. Results go to ``<out>/levers.json`` and a printed table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from stages.runner import loss_curve

LEVERS: dict[str, list[str]] = {
    "baseline (short prompt, no system prompt, fp32, 2 threads)": [],
    "default system prompt": ["model.prompt.system_prompt=null"],
    "no prompt-prefix KV reuse": ["model.prompt.cache_prefix=false"],
    "bf16 autocast": ["trainer.precision=bf16-mixed"],
    "1 thread": ["trainer.num_threads=1"],
    "targets cut to 24 tokens": ["model.prompt.max_target_tokens=24"],
    "lr 1e-4": ["optim.lr=1e-4"],
    "projector init from LLM embeddings": ["model.projector.init_from_llm_embeddings=true"],
    "LoRA r16 on q,v": ["model.llm.lora.enabled=true", "optim.lr_llm=5e-4"],
}


def run_levers(pipeline: str, steps: int, out: Path, only: list[str] | None = None) -> list[dict]:
    rows = []
    common = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps + 1}", "trainer.num_threads=2",
              "trainer.evaluate_before_training=false", "data.val_max_samples=1", "data.test_max_samples=1",
              "optim.warmup_steps=5", "trainer.log_every_n_steps=1"]
    for i, (name, overrides) in enumerate(LEVERS.items()):
        if only and not any(o in name for o in only):
            continue
        run_dir = out / f"lever{i}"
        cmd = [sys.executable, "-m", "stages", "run", pipeline, "--only", "align", "--run-dir", str(run_dir), "--redo",
               *common, *overrides]
        print(f"[bench] {name}: {' '.join(overrides) or '(defaults)'}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"lever": name, "error": proc.stderr[-800:]})
            continue
        stage = next(run_dir.glob("*/align"))
        metrics = json.loads((stage / "metrics.json").read_text())
        tokens = _mean_scalar(stage / "tb", "train/llm_tokens_per_s")
        rows.append({"lever": name, "overrides": overrides, "s_per_step": metrics["train_step_s_mean"],
                     "llm_tokens_per_s": tokens, **loss_curve(stage / "tb")})
    out.mkdir(parents=True, exist_ok=True)
    (out / "levers.json").write_text(json.dumps(rows, indent=1))
    return rows


def _mean_scalar(tb_dir: Path, tag: str) -> float | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    values = [e.value for e in acc.Scalars(tag)][1:] if tag in acc.Tags()["scalars"] else []
    return sum(values) / len(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages bench")
    parser.add_argument("what", choices=["levers"])
    parser.add_argument("--pipeline", default="configs/pipeline/demo.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--only", nargs="*", help="substrings of lever names to run")
    args = parser.parse_args(argv)
    rows = run_levers(args.pipeline, args.steps, args.out, args.only)
    print(f"\n{'lever':<58} {'s/step':>7} {'tok/s':>7} {'loss@0':>7} {'loss@end':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['lever']:<58} failed: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        print(f"{r['lever']:<58} {r['s_per_step']:>7.2f} {r['llm_tokens_per_s'] or 0:>7.0f} "
              f"{r.get('train_loss_first', float('nan')):>7.3f} {r.get('train_loss_last10_mean', float('nan')):>8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
