"""One report for a pipeline run: each stage's metrics next to the baselines that give them meaning.

For the validation sets of a pipeline it measures, once, the two reference points of text-only
alignment: the CTC encoder's own greedy WER (what the LLM has to beat) and the LLM's *ceiling*
(the transcript given to it as text, with the same prompt). Printed, and written to
``<run>/report.json`` and into each stage's ``metrics.json`` under ``report``.
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from datamodules.manifest import load_audio, load_manifest, normalize_target
from speechllm.metrics import corpus_errors
from speechllm.model import SpeechLLM
from stages.runner import resolve_stage_configs


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def baselines(model: SpeechLLM, manifest: str, limit: int, batch_size: int = 8) -> dict[str, float]:
    """Greedy CTC WER of the encoder (if it has a CTC head) and the LLM's text-input ceiling."""
    items = load_manifest(manifest, require_audio=True)
    items = items[:limit] if limit else items
    refs = [normalize_target(u.target_text, "none") for u in items]
    out = {"utterances": len(items)}
    if hasattr(model.encoder, "greedy_transcribe"):
        hyps = []
        for chunk in tqdm(list(_batches(items, batch_size)), desc="greedy CTC", leave=False):
            hyps += model.encoder.greedy_transcribe([load_audio(u.audio, model.encoder.sample_rate) for u in chunk])
        out["ctc_greedy_wer"] = corpus_errors(refs, hyps)[0].wer
    hyps = []
    for chunk in tqdm(list(_batches(refs, batch_size)), desc="LLM ceiling (text input)", leave=False):
        hyps += model.generate_from_text(chunk)
    out["llm_text_ceiling_wer"] = corpus_errors(refs, hyps)[0].wer
    out["llm_text_ceiling_examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]
    return out


def build_report(pipeline: str, run_dir: str | None = None, scale: str | None = None) -> dict:
    stages = resolve_stage_configs(pipeline, [], run_dir, scale)
    report: dict = {"pipeline": pipeline, "scale": scale, "stages": {}, "baselines": {}}
    run_root = stages[0][1].root.parent
    cache = run_root / "baselines.json"
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    for name, stage_dir, cfg in stages:
        if not stage_dir.metrics.is_file():
            report["stages"][name] = {"state": "not finished"}
            continue
        metrics = json.loads(stage_dir.metrics.read_text())
        metrics.pop("report", None)
        report["stages"][name] = metrics
        model = None
        sets, limit = (cfg.data.test, cfg.data.test_max_samples) if cfg.data.test else (cfg.data.val, cfg.data.val_max_samples)
        for set_name, manifest in sets.items():
            key = f"{manifest}|{limit}|{json.dumps(dict(cfg.model.encoder), default=str)}|{cfg.model.llm.pretrained}|{cfg.model.prompt.task_prompt}"
            if key not in cached:
                model = model or SpeechLLM.build(cfg.model).eval()
                cached[key] = {"set": set_name, **baselines(model, manifest, limit)}
                cache.write_text(json.dumps(cached, indent=1))
            report["baselines"][set_name] = cached[key]
    (run_root / "report.json").write_text(json.dumps(report, indent=1))
    for _, stage_dir, _ in stages:
        if stage_dir.metrics.is_file():
            metrics = json.loads(stage_dir.metrics.read_text())
            metrics["report"] = {"baselines": report["baselines"]}
            stage_dir.metrics.write_text(json.dumps(metrics, indent=1))
    return report


def format_report(report: dict) -> str:
    lines = [f"== report: {report['pipeline']} (scale {report['scale'] or 'default'}) =="]
    for set_name, base in report["baselines"].items():
        lines.append(f"[{set_name}] {base['utterances']} utterances")
        if "ctc_greedy_wer" in base:
            lines.append(f"  CTC encoder alone, greedy            WER {base['ctc_greedy_wer']:.3f}")
        lines.append(f"  LLM ceiling (transcript as text)     WER {base['llm_text_ceiling_wer']:.3f}")
        for name, m in report["stages"].items():
            for split in ("test", "val"):
                if f"initial/{split}/{set_name}/wer" in m:
                    lines.append(f"  {name}: before training                WER {m[f'initial/{split}/{set_name}/wer']:.3f}")
                if f"{split}/{set_name}/wer" in m:
                    lines.append(f"  {name}: after {m['steps']} steps               WER {m[f'{split}/{set_name}/wer']:.3f}")
                    break
    for name, m in report["stages"].items():
        if "steps" in m:
            step = m.get("train_step_s_mean")
            lines.append(f"{name}: train loss first {m.get('train_loss_first', float('nan')):.3f} -> last "
                         f"{m.get('train_loss_last') or float('nan'):.3f}; "
                         f"{step:.2f} s/step" if step else f"{name}: {m['steps']} steps")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages report")
    parser.add_argument("pipeline")
    parser.add_argument("--run-dir")
    parser.add_argument("--scale")
    args = parser.parse_args(argv)
    report = build_report(args.pipeline, args.run_dir, args.scale)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
