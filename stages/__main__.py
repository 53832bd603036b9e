"""``python -m stages COMMAND ...``: every command is a subparser whose options the module that
implements it declares (``add_arguments(parser)``) and which it runs (``run(args) -> exit code``).

A command's module is imported only when that command is parsed, so ``--help`` is instant and
``run`` does not import what ``report`` or ``faults`` need.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from types import SimpleNamespace


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="pipeline YAML, e.g. configs/pipeline/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides applied to every stage (before or after the options)")
    parser.add_argument("--run-dir", help="root of the run directories (default: the pipeline's run_dir)")
    parser.add_argument("--scale", help="one of the pipeline's scales (default: its first)")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    _add_pipeline_arguments(parser)
    parser.add_argument("--only", action="append", metavar="STAGE", help="run only this stage (repeatable)")
    parser.add_argument("--redo", action="store_true", help="start the selected (or changed) stages over")
    parser.add_argument("--force", action="store_true",
                        help="with --redo: also start over a stage that is DONE (it is moved aside, not deleted)")


def _run(args: argparse.Namespace) -> int:
    from stages.runner import run_pipeline

    results = run_pipeline(args.pipeline, args.overrides, args.only, args.redo, args.run_dir, args.scale, force=args.force)
    print(json.dumps(results, indent=1))
    return 0


def _status(args: argparse.Namespace) -> int:
    from stages.runner import pipeline_status

    for row in pipeline_status(args.pipeline, args.overrides, args.run_dir, args.scale):
        metrics = row.get("metrics", {})
        wers = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.endswith("/wer"))
        print(f"{row['stage']:<12} {row['kind']:<8} {row['state']:<40} {wers}  {row['dir']}")
    return 0


def _add_schema_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", nargs="?", default="",
                        help="only keys starting with this, e.g. optim. or data.sources (default: all)")


def _schema(args: argparse.Namespace) -> int:
    from speechllm.config import describe_schema

    lines = describe_schema(args.prefix)
    if not lines:
        print(f"error: no stage config key starts with {args.prefix!r}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


# `python -m stages prepare STEP ...`: (one-line purpose, module)
PREPARE_STEPS = {
    "tiny": ("synthetic data for the tiny pipeline (noise clips, random words)", "stages.prepare_tiny_data"),
    "demo-data": ("the demo's text, speech and multiple-choice sets: Debian fortunes spoken by offline TTS voices",
                  "stages.prepare_demo_data"),
    "ctc-head": ("train a CTC head on frozen Whisper states (the posteriors TASU needs)", "stages.prepare_ctc_head"),
    "posterior-stats": ("measure a pipeline's CTC encoder on training voices (for matched CPS noise)",
                        "stages.prepare_posterior_stats"),
    "simulator": ("train a learned posterior simulator on the CTC encoder's real output (text_side: learned)",
                  "stages.prepare_simulator"),
    "word-times": ("word times for natural speech by CTC forced alignment", "stages.prepare_word_times"),
    "real-speech": ("one real speaker (Debian's Asterisk prompts, G.722) -> train/dev/test manifests", "stages.prepare_real_speech"),
    "broad-text": ("broad-domain English text documents (WordNet, GCIDE, gensim's news and Wikipedia samples)", "stages.prepare_broad_text"),
    "mixture": ("several text manifests as one (the broad pool), each row tagged with its source; no held-out sentence in it",
                "stages.prepare_mixture"),
    "librispeech": ("LibriSpeech subset folders (and its LM text) -> manifests", "stages.prepare_librispeech"),
    "common-voice": ("a Common Voice release's TSV splits -> manifests", "stages.prepare_common_voice"),
    "libriheavy": ("Lhotse-style cuts (LibriHeavy JSONL) -> a manifest, segments as clips", "stages.prepare_libriheavy"),
    "text-corpus": ("a text dataset (local file or Hub id), sampled -> a text/documents manifest",
                    "stages.prepare_text_corpus"),
}


def _add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    steps = parser.add_subparsers(dest="step", required=True, metavar="STEP", title="steps")
    for name, (purpose, module) in PREPARE_STEPS.items():
        steps.add_parser(name, help=purpose, description=purpose, implementation=module)


# `python -m stages COMMAND ...`: (one-line purpose, the module, or namespace, with add_arguments and run)
COMMANDS = {
    "run": ("run (or resume) a pipeline's stages",
            SimpleNamespace(add_arguments=_add_run_arguments, run=_run)),
    "status": ("where each stage of a pipeline stands, with its WERs",
               SimpleNamespace(add_arguments=_add_pipeline_arguments, run=_status)),
    "schema": ("every stage config key with its type, allowed values, default and help",
               SimpleNamespace(add_arguments=_add_schema_arguments, run=_schema)),
    "decode": ("transcribe a manifest with an exported model and score it", "stages.decode"),
    "transcribe": ("transcribe audio files with an exported model: one <path>TAB<text> line each", "stages.transcribe"),
    "export": ("copy a model with its local parts into one movable directory (--merge-lora: LoRA merged)",
               "stages.export"),
    "report": ("one report for a pipeline run: stage metrics and baselines", "stages.report"),
    "bench": ("benchmarks that compare configurations: levers, distill, memory, overhead, padding, gpu or all", "stages.bench"),
    "faults": ("inject each fault into a tiny run and print what was lost", "stages.faults"),
    "estimate": ("GPU memory per device and hours per 1k steps of each stage, from parameter counts (estimates)",
                 "stages.estimate"),
    "prepare": ("prepare data or assets (one STEP; see prepare --help)",
                SimpleNamespace(add_arguments=_add_prepare_arguments)),
}


class CommandParser(argparse.ArgumentParser):
    """A command's parser: ``implementation`` (a module name, or an object) declares its options when
    the command is parsed or its help is shown, and its ``run`` becomes the namespace's ``_run``."""

    def __init__(self, *args, implementation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._implementation = implementation

    def _declare(self) -> None:
        impl, self._implementation = self._implementation, None
        if impl is None:
            return
        impl = importlib.import_module(impl) if isinstance(impl, str) else impl
        impl.add_arguments(self)
        self.set_defaults(_parser=self)
        if hasattr(impl, "run"):
            self.set_defaults(_run=impl.run)

    def parse_known_args(self, args=None, namespace=None):
        self._declare()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._declare()
        return super().format_usage()

    def format_help(self) -> str:
        self._declare()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages", description="The speech-LLM pipeline's commands "
                                     "(`python -m stages COMMAND --help`: that command's options).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                                parser_class=CommandParser)
    for name, (purpose, impl) in COMMANDS.items():
        sub.add_parser(name, help=purpose, description=purpose, implementation=impl)
    return parser


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def main(argv: list[str] | None = None, command: tuple[str, ...] = ()) -> int:
    """``python -m stages [*command, *argv]`` (argv: default sys.argv[1:])."""
    argv = [*command, *(sys.argv[1:] if argv is None else argv)]
    args, extra = build_parser().parse_known_args(argv)
    # key=value overrides after an option are left over by argparse: they still belong to the command
    stray = [e for e in extra if not (hasattr(args, "overrides") and _is_override(e))]
    if stray:
        args._parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from speechllm.config import ConfigError  # after parsing: --help needs neither
    from speechllm.manifest import ManifestError

    try:
        return args._run(args) or 0
    except (ConfigError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
