"""Padding in the LLM batches of the embedded default's stages, and what packing them saves (numbers to
read, never asserted).

``python -m stages.bench_padding [--pipeline configs/pipeline/demo.yaml] [--batches 100] [--time-batches 3]
[--out padding.json]``, from the repository root (the pipeline's data and asset paths are relative to it).

What is measured, per enabled stage (the demo: align, asr, distill, select, at its batch settings):

* **rows**: the stage's own data module (:class:`datamodules.speech_text.SpeechTextDataModule`, the
  stage's sources, shares and batch size) draws ``--batches`` training batches; each becomes the LLM
  rows the stage builds from it: instruction rows (align, asr), interleaved span rows of the documents
  (distill, select) or plain text rows (their text source). Every speech slot counts as one LLM token
  of the words it stands for, so these are the rows the text teacher reads: no encoder runs (the
  demo's LSD keeps about 0.94 speech vectors per token, configs/model/demo.yaml). The select stage's
  synthetic documents are only made when its training starts, so its natural documents stand in.
* **padding share**: padding positions / all positions of the left-padded batches,
  sum(B * max_len - sum len) / sum(B * max_len); 0 when packed (``model.pack_sequences``), by
  construction; and what bucketing by length would leave: each window of ``--window`` consecutive
  batches of one source re-cut, sorted by row length, into batches of the same sizes.
* **step time**: a training forward + backward of the stage's LLM (the demo's SmolLM2-135M with its
  LoRA, float32, ``--threads`` threads: ``SpeechLLM.labelled_hidden`` and the LM loss) on the first
  ``--time-batches`` batches, padded and packed in turn after one untimed step; packed / padded, in
  this process's CPU seconds (robust to the machine's other load with one thread) and in wall seconds.
  With sdpa or eager attention a packed row's attention is one (total x total) masked product, so
  packing saves the padding's share of the projections and MLPs, not of the attention (flash attention
  on a GPU computes each row on its own).

The model is built from the first stage's model config (the demo's stages share it) with the tiny
preset's random encoder in place of the real one, which is never run, so the demo's CTC head need not
exist. Without the demo data this says so and returns 2.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINE = REPO / "configs" / "pipeline" / "demo.yaml"
TINY_PRESET = REPO / "configs" / "model" / "tiny.yaml"


def row_model(model_cfg):
    """The stage's LLM, tokenizer and prompt, with the tiny preset's random encoder (never run)."""
    from speechllm.config import EncoderConfig
    from speechllm.model import SpeechLLM

    cfg = copy.deepcopy(model_cfg)
    cfg.encoder = OmegaConf.merge(OmegaConf.structured(EncoderConfig), OmegaConf.load(TINY_PRESET).model.encoder)
    return SpeechLLM.build(cfg).train()


def missing_manifests(cfg) -> list[str]:
    sources = cfg.data.sources.values() if cfg.data.sources else [{"manifest": cfg.data.train}]
    return [m for m in (s["manifest"] for s in sources) if m and not Path(m).is_file()]


def training_batches(cfg, tokenizer, n: int) -> list[dict]:
    """The first ``n`` batches of the stage's training data module."""
    from datamodules.speech_text import SpeechTextDataModule
    from lightning_modules import STAGE_KINDS

    data = SpeechTextDataModule(cfg, STAGE_KINDS[cfg.kind].source_kinds[0], tokenizer=tokenizer)
    if cfg.kind == "select":  # the synthetic documents are made at fit start: the natural ones stand in
        data.manifest_overrides[cfg.selection.source] = cfg.data.sources[cfg.selection.natural].manifest
    return list(itertools.islice(data.train_dataloader(), n))


def stage_rows(model, cfg, batch: dict) -> tuple[list[list[int]], list[list[int]]]:
    """The LLM rows and labels the stage builds from ``batch``, each speech slot one token of its words."""
    from speechllm.sequences import plan_batch, span_rows, text_views

    if batch["kind"] == "text":
        views = text_views(model, batch["text"])
        return views.student_rows, views.student_labels
    if cfg.kind in ("distill", "select") and cfg.distill.format == "interleaved":
        generators = [torch.Generator().manual_seed(seed) for seed in batch["seed"]]
        plans = plan_batch(batch["words"], generators, tuple(cfg.distill.text_span_words),
                           tuple(cfg.distill.speech_span_words))
        return span_rows(model, plans, None)
    return model.instruction_rows(model.text_ids(batch["text"]), model.target_ids(batch["target"]))


def padding_share(batches: list[list[int]]) -> float:
    """Padding positions / all positions of left-padded batches, given each batch's row lengths."""
    positions = sum(len(lengths) * max(lengths) for lengths in batches)
    return (positions - sum(map(sum, batches))) / positions


def bucketed(batches: list[tuple[str, list[int]]], window: int) -> list[list[int]]:
    """Each window of batches, per source, re-cut into batches of the same sizes from its rows sorted by length."""
    out = []
    for start in range(0, len(batches), window):
        group = batches[start:start + window]
        for source in dict.fromkeys(s for s, _ in group):
            sizes = [len(lengths) for s, lengths in group if s == source]
            ordered = sorted(n for s, lengths in group if s == source for n in lengths)
            for end, size in zip(itertools.accumulate(sizes), sizes):
                out.append(ordered[end - size:end])
    return out


def step_seconds(model, rows: list[list[int]], labels: list[list[int]], *, pack: bool) -> tuple[float, float]:
    """Wall and CPU seconds of one training forward + backward of the LLM on the rows, padded or packed."""
    from speechllm.losses import lm_loss

    model.cfg.pack_sequences = pack
    wall, cpu = time.perf_counter(), time.process_time()
    hidden, targets = model.labelled_hidden(rows, labels)
    lm_loss(hidden, model.lm_head, targets, chunk_size=model.cfg.loss_chunk_size)["loss"].backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model.zero_grad(set_to_none=True)
    return wall, cpu


def time_layouts(model, timed: list[tuple[list[list[int]], list[list[int]]]]) -> dict:
    """Padded and packed step seconds summed over the batches, each batch alternating which goes first.

    CPU seconds (this process's) are what to read on a machine others use: with one thread they are
    the step's own compute, whatever else runs; wall seconds are kept beside them.
    """
    step_seconds(model, *timed[0], pack=False)  # warm-up: allocator, kernels, lazy imports
    seconds = {f"{layout}_{clock}_s": 0.0 for layout in ("padded", "packed") for clock in ("wall", "cpu")}
    for i, (rows, labels) in enumerate(timed):
        for layout in ("padded", "packed") if i % 2 == 0 else ("packed", "padded"):
            wall, cpu = step_seconds(model, rows, labels, pack=layout == "packed")
            seconds[f"{layout}_wall_s"] += wall
            seconds[f"{layout}_cpu_s"] += cpu
    return {"batches": len(timed), "tokens": sum(len(r) for rows, _ in timed for r in rows), **seconds,
            **{f"packed_over_padded_{clock}": seconds[f"packed_{clock}_s"] / seconds[f"padded_{clock}_s"]
               for clock in ("wall", "cpu")}}


def measure_stage(model, cfg, args) -> dict:
    batches = training_batches(cfg, model.tokenizer, args.batches)
    built = [(batch["source"], *stage_rows(model, cfg, batch)) for batch in batches]
    lengths = [(source, [len(r) for r in rows]) for source, rows, _ in built]
    plain = [row_lengths for _, row_lengths in lengths]
    return {
        "batches": len(plain), "rows": sum(map(len, plain)), "tokens": sum(map(sum, plain)),
        "mean_row_length": sum(map(sum, plain)) / sum(map(len, plain)),
        "sources": dict(sorted({s: sum(1 for t, _ in lengths if t == s) for s, _ in lengths}.items())),
        "padding_share_padded": padding_share(plain), "padding_share_packed": 0.0,
        f"padding_share_bucketed_{args.window}": padding_share(bucketed(lengths, args.window)),
        "step_time": time_layouts(model, [(rows, labels) for _, rows, labels in built[:args.time_batches]]),
    }


def print_table(results: dict) -> None:
    print(f"\n{'stage':<8} {'batches':>7} {'rows':>5} {'mean len':>8} {'pad padded':>10} {'pad bucketed':>12} "
          f"{'pad packed':>10} {'padded cpu s':>12} {'packed cpu s':>12} {'packed/padded cpu':>17} {'(wall)':>6}")
    for name, r in results.items():
        t, bucket = r["step_time"], next(v for k, v in r.items() if k.startswith("padding_share_bucketed"))
        print(f"{name:<8} {r['batches']:>7} {r['rows']:>5} {r['mean_row_length']:>8.1f} {r['padding_share_padded']:>10.1%} "
              f"{bucket:>12.1%} {r['padding_share_packed']:>10.1%} {t['padded_cpu_s']:>12.2f} {t['packed_cpu_s']:>12.2f} "
              f"{t['packed_over_padded_cpu']:>17.2f} {t['packed_over_padded_wall']:>6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.bench_padding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=str(DEFAULT_PIPELINE), help="pipeline YAML (default: the demo's)")
    parser.add_argument("--stages", nargs="+", help="stage names (default: every enabled stage)")
    parser.add_argument("--batches", type=int, default=100, help="training batches per stage (default: %(default)s)")
    parser.add_argument("--window", type=int, default=8, help="batches per bucketing window (default: %(default)s)")
    parser.add_argument("--time-batches", type=int, default=3, help="batches timed per stage (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    from stages.runner import resolve_stage_configs

    torch.set_num_threads(args.threads)
    stages = [(name, cfg) for name, _, cfg in resolve_stage_configs(args.pipeline, [])
              if cfg.enabled and (not args.stages or name in args.stages)]
    missing = sorted({m for _, cfg in stages for m in missing_manifests(cfg)})
    if missing:
        print(f"bench padding needs the demo data ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} "
              "missing): run `make demo-data` (python -m stages prepare demo-data data/demo --scale demo) "
              "in the repository root first")
        return 2
    torch.manual_seed(0)
    model = row_model(stages[0][1].model)
    results = {}
    for name, cfg in stages:
        print(f"[bench padding] {name}: {args.batches} batches", flush=True)
        results[name] = measure_stage(model, cfg, args)
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"pipeline": str(args.pipeline), "threads": args.threads,
                                        "llm": stages[0][1].model.llm.pretrained, "stages": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
