"""``python -m stages {run,status,decode,prepare} ...``: thin entry points over the runner."""

from __future__ import annotations

import argparse
import json
import sys

from speechllm.config import ConfigError
from speechllm.manifest import ManifestError

# `python -m stages prepare WHAT ...` -> that module's main(argv)
PREPARE_STEPS = {
    "tiny": "stages.prepare_tiny_data",
    "demo-data": "stages.prepare_demo_data",
    "ctc-head": "stages.prepare_ctc_head",
    "posterior-stats": "stages.prepare_posterior_stats",
    "word-times": "stages.prepare_word_times",
}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a pipeline's stages")
    run.add_argument("pipeline", help="pipeline YAML, e.g. configs/pipeline/demo.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides applied to every stage")
    run.add_argument("--only", action="append", help="run only this stage (repeatable)")
    run.add_argument("--redo", action="store_true", help="start the selected (or changed) stages over")
    run.add_argument("--run-dir", help="root of the run directories (default: the pipeline's run_dir)")
    run.add_argument("--scale", help="one of the pipeline's scales (default: its first)")

    status = sub.add_parser("status", help="where a pipeline stands")
    status.add_argument("pipeline")
    status.add_argument("overrides", nargs="*")
    status.add_argument("--run-dir")
    status.add_argument("--scale")

    dec = sub.add_parser("decode", help="transcribe a manifest with an exported model and score it")
    dec.add_argument("--model", required=True, help="a stage's model/ directory")
    dec.add_argument("--manifest", required=True)
    dec.add_argument("--out", required=True, help="hypotheses JSONL")
    dec.add_argument("--batch-size", type=int, default=8)
    dec.add_argument("--beam", type=int, default=None, help="beam size (default: the model's config)")
    dec.add_argument("--max-new-tokens", type=int, default=None)
    dec.add_argument("--no-repeat-ngram", type=int, default=None, help="repetition guard: no n-gram twice")
    dec.add_argument("--repetition-penalty", type=float, default=None)
    dec.add_argument("--normalizer", default="whisper", choices=["whisper", "tasu", "none"])
    dec.add_argument("--limit", type=int, default=0)

    sub.add_parser("report", help="one report for a pipeline run: stage metrics + baselines (-h)")
    sub.add_parser("bench", help="benchmarks: levers | distill | memory | all (-h)")
    sub.add_parser("faults", help="inject each fault into a tiny run and print what was lost (-h)")
    prep = sub.add_parser("prepare", help="prepare data or assets; options after WHAT go to that step (-h)")
    prep.add_argument("what", choices=sorted(PREPARE_STEPS))
    prep.add_argument("step_args", nargs=argparse.REMAINDER)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["report"], ["bench"], ["faults"]):  # their own argument parsers
        import importlib

        return importlib.import_module(f"stages.{argv[0]}").main(argv[1:])
    if argv[:1] == ["prepare"]:  # everything after WHAT belongs to the preparation step
        args, extra = parser.parse_args(argv[:2]), []
        args.step_args = argv[2:]
    else:  # key=value overrides may come before or after the options
        args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or args.command not in ("run", "status")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = args.overrides + extra
    try:
        if args.command == "run":
            from stages.runner import run_pipeline

            results = run_pipeline(args.pipeline, args.overrides, args.only, args.redo, args.run_dir, args.scale)
            print(json.dumps(results, indent=1))
        elif args.command == "status":
            from stages.runner import pipeline_status

            for row in pipeline_status(args.pipeline, args.overrides, args.run_dir, args.scale):
                metrics = row.get("metrics", {})
                wers = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.endswith("/wer"))
                print(f"{row['stage']:<12} {row['kind']:<8} {row['state']:<40} {wers}  {row['dir']}")
        elif args.command == "decode":
            from omegaconf import OmegaConf

            from speechllm.config import GenerationConfig
            from stages.decode import decode_manifest, load_for_decoding

            model = load_for_decoding(args.model)
            gen = GenerationConfig(**OmegaConf.to_container(model.cfg.generation))
            gen.num_beams = args.beam or gen.num_beams
            gen.max_new_tokens = args.max_new_tokens or gen.max_new_tokens
            if args.no_repeat_ngram is not None:
                gen.no_repeat_ngram_size = args.no_repeat_ngram
            if args.repetition_penalty is not None:
                gen.repetition_penalty = args.repetition_penalty
            result = decode_manifest(model, args.manifest, args.out, batch_size=args.batch_size, gen=gen,
                                     normalizer=args.normalizer, limit=args.limit)
            print(f"WER {result['wer']:.4f}  (S={result['substitutions']} D={result['deletions']} "
                  f"I={result['insertions']} N={result['ref_words']}, {result['utterances']} utterances, "
                  f"normaliser {result['normalizer']}) -> {args.out}")
        elif args.command == "prepare":
            import importlib

            return importlib.import_module(PREPARE_STEPS[args.what]).main(args.step_args) or 0
    except (ConfigError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
