"""Export a model directory as one that can be moved and used on its own.

``python -m stages export --model runs/demo/asr/model --out my-model [--merge-lora]``

Every frozen part the model names by a local path (the encoder, its CTC head, the LLM, ...) is copied
into ``OUT`` and ``model.json`` points at the copies (Hub ids stay ids). ``--merge-lora`` folds the
LoRA adapters into the LLM's weights and saves that LLM in full (``OUT/llm``, a plain transformers
folder), so loading needs no peft. Without it the trained weights stay the trainable-only
``trainable.safetensors`` of every export. The model card (``README.md``) takes the stage's config and
metrics from the stage directory around ``--model`` when it has them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speechllm.model_card import read_stage_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="an exported model/ directory, e.g. runs/demo/asr/model")
    parser.add_argument("--out", required=True, help="the directory to write (created; its parts replaced)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="merge the LoRA adapters into the LLM and save it in full (no peft needed to load)")


def export_model(model_dir: str | Path, out: str | Path, merge_lora: bool = False) -> Path:
    from speechllm.model import SpeechLLM

    model_dir, out = Path(model_dir), Path(out)
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out} is the model directory itself: export into another one")
    model = SpeechLLM.from_pretrained(model_dir)
    if merge_lora:
        model.merge_lora()
    stage, metrics = read_stage_files(model_dir.parent)
    model.save_pretrained(out, self_contained=True, metrics=metrics, stage_config=stage)
    return out


def run(args: argparse.Namespace) -> int:
    if not (Path(args.model) / "model.json").is_file():
        print(f"error: --model {args.model}: not an exported model directory (no model.json)", file=sys.stderr)
        return 2
    try:
        out = export_model(args.model, args.out, args.merge_lora)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.model} -> {out}{' (LoRA merged into llm/)' if args.merge_lora else ''}")
    return 0
