"""One report for a pipeline run: each stage's metrics next to the baselines that give them meaning.

For the validation sets of a pipeline it measures, once, the reference points: Whisper's own
encoder-decoder WER where the encoder is a whole Whisper checkpoint (what a user would pick instead),
the CTC encoder's own greedy WER (what the LLM has to beat) and the LLM's *ceiling* (the transcript
given to it as text, with the same prompt). Printed, and written to
``<run>/report.json`` and into each stage's ``metrics.json`` under ``report``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from lightning_modules.evaluation import read_eval_rows, summarise
from speechllm.encoders import encoder_kind
from speechllm.manifest import load_audio, load_manifest, normalize_target
from speechllm.metrics import corpus_errors
from speechllm.model import SpeechLLM
from speechllm.whisper_decoder import WhisperTranscriber, has_whisper_decoder
from stages.runner import resolve_stage_configs

MEASURE_KEYS = ("M", "M_low", "M_high", "F", "F_low", "F_high")


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def _items(manifest: str, limit: int):
    items = load_manifest(manifest, require_audio=True)
    return items[:limit] if limit else items


@torch.no_grad()
def whisper_own_wer(pretrained: str, manifest: str, limit: int, batch_size: int = 8) -> float:
    """WER of Whisper's own encoder-decoder transcription (``speechllm.whisper_decoder``)."""
    whisper = WhisperTranscriber(pretrained)
    items = _items(manifest, limit)
    hyps = []
    for chunk in tqdm(list(_batches(items, batch_size)), desc="Whisper's own decoder", leave=False):
        hyps += whisper.transcribe([load_audio(u.audio, whisper.sample_rate) for u in chunk])
    return corpus_errors([normalize_target(u.target_text, "none") for u in items], hyps)[0].wer


@torch.no_grad()
def baselines(model: SpeechLLM, manifest: str, limit: int, batch_size: int = 8) -> dict[str, float]:
    """Greedy CTC WER of the encoder (if it has a CTC head) and the LLM's text-input ceiling."""
    items = _items(manifest, limit)
    refs = [normalize_target(u.target_text, "none") for u in items]
    out = {"utterances": len(items)}
    if encoder_kind(model.cfg.encoder.kind).is_ctc:
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
        if not cfg.enabled and not stage_dir.metrics.is_file():
            continue  # a comparison run at another scale (or enabled by an override) is shown once it ran
        if not stage_dir.metrics.is_file():
            report["stages"][name] = {"state": "not finished"}
            continue
        metrics = json.loads(stage_dir.metrics.read_text())
        metrics.pop("report", None)
        report["stages"][name] = metrics
        simulator = Path(cfg.model.encoder.cps.simulator or "") / "report.json"
        if cfg.model.encoder.text_side == "learned" and simulator.is_file():
            found = json.loads(simulator.read_text())
            report.setdefault("simulators", {})[str(simulator.parent)] = {
                k: found[k] for k in ("bins", "heldout", "heldout_sentences", "train_pairs", "train_seconds", "pairs_seconds")}
        selection = stage_dir.root / "selection" / "report.json"
        if selection.is_file():
            report.setdefault("selection", {})[name] = json.loads(selection.read_text())
        if along := measures_along_training(stage_dir.root, cfg):
            report.setdefault("along_training", {})[name] = along
        model = None
        sets, limit = (cfg.data.test, cfg.data.test_max_samples) if cfg.data.test else (cfg.data.val, cfg.data.val_max_samples)
        for set_name, manifest in sets.items():
            # Everything the two baselines depend on: the encoder's speech path, the LLM, the prompt and how
            # it generates (not the text side: stages that differ only there share them).
            speech_path = {k: v for k, v in dict(cfg.model.encoder).items() if k not in ("text_side", "cps")}
            key = "|".join([manifest, str(limit), cfg.model.llm.pretrained or "", *(
                json.dumps(dict(part), default=str) for part in (speech_path, cfg.model.prompt, cfg.model.generation))])
            if key not in cached:
                model = model or SpeechLLM.build(cfg.model).eval()
                cached[key] = {"set": set_name, **baselines(model, manifest, limit)}
                cache.write_text(json.dumps(cached, indent=1))
            decoding = json.dumps(WhisperTranscriber.decoding)
            if cached[key].get("whisper_decoding") != decoding and has_whisper_decoder(cfg.model.encoder.pretrained):
                cached[key]["whisper_own_wer"] = whisper_own_wer(cfg.model.encoder.pretrained, manifest, limit)
                cached[key]["whisper_decoding"] = decoding
                cache.write_text(json.dumps(cached, indent=1))
            report["baselines"][set_name] = {**cached[key], "manifest": manifest}
    if targeted := targeted_heldout(stages, report.get("selection", {})):
        report["targeted_heldout"] = targeted
    (run_root / "report.json").write_text(json.dumps(report, indent=1))
    for _, stage_dir, _ in stages:
        if stage_dir.metrics.is_file():
            metrics = json.loads(stage_dir.metrics.read_text())
            metrics["report"] = {"baselines": report["baselines"]}
            stage_dir.metrics.write_text(json.dumps(metrics, indent=1))
    return report


def _eval_sets(metrics: dict) -> dict[str, dict[str, tuple]]:
    """{set: {metric: (before, after)}} from a stage's metrics (``initial/<split>/<set>/<m>``, ``<split>/<set>/<m>``)."""
    sets: dict[str, dict[str, list]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        before = parts[0] == "initial"
        parts = parts[1:] if before else parts
        if len(parts) != 3 or parts[0] not in ("val", "test") or not isinstance(value, (int, float)):
            continue
        _, set_name, metric = parts
        pair = sets.setdefault(set_name, {}).setdefault(metric, [None, None])
        pair[0 if before else 1] = value
    return {name: {m: tuple(v) for m, v in d.items()} for name, d in sets.items()}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_interval(value, low=None, high=None) -> str:
    """``value [low, high]``: a measure and its bootstrap interval (the value alone where none was recorded)."""
    return _fmt(value) if value is None or low is None or high is None else f"{value:.3f} [{low:.3f}, {high:.3f}]"


BOUNDS = ("", "_low", "_high")  # a metric's key suffixes: its value and its interval


SHOWN = {"wer": "WER", "M": "M", "F": "F", "acc_speech": "acc speech", "acc_text": "acc text",
         "acc_text_original": "acc text (original LLM)", "gap": "gap (text orig. - speech)",
         "ctc_chosen": "head's own transcript won"}  # (joint CTC/LLM decoding)


def format_report(report: dict) -> str:
    lines = [f"== report: {report['pipeline']} (scale {report['scale'] or 'default'}) =="]
    for set_name, base in report["baselines"].items():
        lines.append(f"[{set_name}] {base['utterances']} utterances ({base.get('manifest', 'held-out voices')})")
        if "whisper_own_wer" in base:
            lines.append(f"  Whisper alone, its own decoder       WER {base['whisper_own_wer']:.3f}")
        if "ctc_greedy_wer" in base:
            lines.append(f"  CTC encoder alone, greedy            WER {base['ctc_greedy_wer']:.3f}")
        lines.append(f"  LLM ceiling (transcript as text)     WER {base['llm_text_ceiling_wer']:.3f}")
    for name, m in report["stages"].items():
        if "steps" not in m:
            lines.append(f"-- {name}: {m.get('state', 'not run')}")
            continue
        step = m.get("train_step_s_mean")
        lines.append(f"-- {name} ({m['kind']}): {m['steps']} steps, train loss {m.get('train_loss_first', float('nan')):.3f} -> "
                     f"{m.get('train_loss_last10_mean', float('nan')):.3f} (last 10 mean)"
                     + (f", {step:.2f} s/step" if step else "") + (f" ({m['precision']})" if m.get("precision") else "")
                     + f", {m.get('wall_time_s_this_run', 0):.0f} s wall")
        for set_name, metrics in _eval_sets(m).items():
            for metric, label in SHOWN.items():
                if metric in metrics:
                    before, after = (_fmt_interval(*(metrics.get(metric + b, (None, None))[i] for b in BOUNDS)) for i in (0, 1))
                    lines.append(f"   {set_name:<14} {label:<26} {before} -> {after}")
        skipped = {k: v for k, v in m.items() if k.startswith("skipped/") and v}
        if skipped:
            lines.append("   skipped: " + ", ".join(f"{k.removeprefix('skipped/')} {v}" for k, v in skipped.items()))
    lines += comparisons(report)
    for path, sim in report.get("simulators", {}).items():
        lines.append(f"-- learned simulator {path} ({sim['train_pairs']} training pairs, {sim['train_seconds']:.0f} s): "
                     f"requested vs achieved greedy WER on {sim['heldout_sentences']} held-out sentences")
        lines += [f"   requested {b['requested']:.1f}   achieved {b['achieved']:.3f}   (uncalibrated {b['achieved_uncalibrated']:.3f})"
                  for b in sim["bins"]]
    for name, sel in report.get("selection", {}).items():
        top = sel["clusters"][:5]
        lines.append(f"-- {name}: selection (gamma {sel['gamma']}): {sel['selected']} texts, "
                     f"{sel.get('synthesised_seconds', 0):.0f} s synthesised; clusters by M:")
        for c in top:
            topics = ", ".join(f"{t['topic']} {t['share']:.0%}" for t in c["topics"])
            sources = ", ".join(f"{t['source']} {t['share']:.0%}" for t in c.get("sources", []) if t["source"])
            after = f" -> {c['M_after']:.4f} after" if "M_after" in c else ""
            lines.append(f"   cluster {c['cluster']:>3}  M {c['M']:.4f}{after}  P_web {c['p_web']:.3f}  P_target {c['p_target']:.3f}"
                         f"  selected {c['selected']:>3}  [{topics}]" + (f" [{sources}]" if sources else ""))
        for group, label in (("targeted", "targeted"), ("others", "other")):
            g = sel.get("M_after_summary", {}).get(group)
            if g and g["clusters"]:
                lines.append(f"   mean M of {label} clusters ({g['clusters']}): {g['M']:.4f} -> {g['M_after']:.4f} "
                             f"after training ({g['change']:+.4f})")
        lines.append("   selected topics: " + ", ".join(f"{t} {n}" for t, n in list(sel["selected_topics"].items())[:8]))
        if any(sel.get("selected_sources", {})):
            lines.append("   selected sources: " + ", ".join(f"{t} {n}" for t, n in sel["selected_sources"].items()))
    return "\n".join(lines)


def _final_key(m: dict, metric: str, set_name: str | None = None) -> str | None:
    """The key of a stage's final ``metric`` (on ``set_name``, or its first set): on a test set where it
    has one, else on validation."""
    for split in ("test", "val"):
        for key in m:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == split and parts[2] == metric and set_name in (None, parts[1]):
                return key
    return None


def _final(m: dict, metric: str, set_name: str | None = None) -> str:
    """A stage's final ``metric`` with its interval, formatted (``-`` where it has none)."""
    key = _final_key(m, metric, set_name)
    return _fmt_interval(*(m.get(key + b) for b in BOUNDS)) if key else _fmt(None)


def _measured(rows: list[dict]) -> dict[str, float]:
    return {k: v for k, v in summarise("measure", rows).items() if k in MEASURE_KEYS} if rows else {}


def measures_along_training(stage_root: Path, cfg) -> dict[str, list[dict]]:
    """Set -> M and F (with intervals) at every kept validation of the stage's held-out documents
    (``eval/val/<set>/step-<N>.jsonl``): before training, along it, after it."""
    out = {}
    for set_name in cfg.measures.sets:
        steps = read_eval_rows(stage_root, "val", set_name)
        if steps:
            out[set_name] = [{"step": step, "documents": len(rows), **_measured(rows)} for step, rows in steps.items()]
    return out


def _final_rows(stage_root: Path, set_name: str) -> list[dict]:
    """A set's rows at the stage's last kept validation (its final model)."""
    steps = read_eval_rows(stage_root, "val", set_name)
    return steps[max(steps)] if steps else []


def targeted_heldout(stages: list, selections: dict[str, dict]) -> dict:
    """For each selection stage S and each selection T that ran (T = S, and the other runs on the same
    clusters, so uniform selection is read on the clusters active selection aimed at): held-out M and F
    over the documents nearest T's targeted clusters, and over the others, before stage S (its
    ``init_from`` stage's final validation) and after it. Needs S's ``selection/heldout_clusters.json``."""
    roots = {name: (stage_dir.root, cfg) for name, stage_dir, cfg in stages}
    out: dict = {}
    for name, sel in selections.items():
        root, cfg = roots[name]
        clusters_file = root / "selection" / "heldout_clusters.json"
        if not clusters_file.is_file() or not cfg.init_from:
            continue
        nearest = json.loads(clusters_file.read_text())["sets"]
        before_root = Path(cfg.init_from).parent
        rows = {set_name: (_final_rows(before_root, set_name), _final_rows(root, set_name)) for set_name in nearest}
        for aim, aim_sel in selections.items():
            if aim_sel.get("clusters_k") != sel.get("clusters_k"):
                continue
            targeted = {c["cluster"] for c in aim_sel["clusters"] if c.get("targeted")}
            for set_name, doc_cluster in nearest.items():
                before, after = rows[set_name]
                if not after:
                    continue
                row = {}
                for group, wanted in (("targeted", True), ("others", False)):
                    ids = {d for d, c in doc_cluster.items() if (c in targeted) == wanted}
                    row[group] = {"clusters": len(targeted) if wanted else sel["clusters_k"] - len(targeted),
                                  "documents": sum(r["id"] in ids for r in after),
                                  "before": _measured([r for r in before if r["id"] in ids]),
                                  "after": _measured([r for r in after if r["id"] in ids])}
                out.setdefault(name, {}).setdefault(aim, {})[set_name] = row
    return out


def _fmt_measure(values: dict, metric: str = "M") -> str:
    return _fmt_interval(values.get(metric), values.get(f"{metric}_low"), values.get(f"{metric}_high"))


def analyses(report: dict) -> list[str]:
    """M along training, and held-out M where selection aimed."""
    out = []
    for name, sets in report.get("along_training", {}).items():
        if any(len(points) > 2 for points in sets.values()):  # more than before and after
            out.append(f"== {name}: held-out M and F along training ==")
            for set_name, points in sets.items():
                for p in points:
                    out.append(f"   {set_name:<14} step {p['step']:>5}  M {_fmt_measure(p)}  F {_fmt_measure(p, 'F')}"
                               f"  ({p['documents']} documents)")
    for name, aims in report.get("targeted_heldout", {}).items():
        for aim, sets in aims.items():
            whose = "its own" if aim == name else f"{aim}'s"
            out.append(f"== {name}: held-out M on the documents nearest {whose} targeted clusters, before -> after ==")
            for set_name, groups in sets.items():
                for group, g in groups.items():
                    out.append(f"   {set_name:<14} {group:<9} ({g['clusters']} clusters, {g['documents']} documents)"
                               f"  {_fmt_measure(g['before'])} -> {_fmt_measure(g['after'])}")
    return out


def comparisons(report: dict) -> list[str]:
    """The tables of the comparison runs, for the stages that ran (each value with its 95 % interval)."""
    out = []
    stages = report["stages"]
    if {"asr", "asr_scratch"} <= set(stages):
        out += ["== stage 2: WER on held-out voices (test set) at the same real-speech budget and steps ==",
                f"   (a) stage 1 only, zero-shot          {_final(stages.get('align', {}), 'wer')}",
                f"   (b) stage 2 from a fresh projector   {_final(stages.get('asr_scratch', {}), 'wer')}",
                f"   (c) stage 1 -> stage 2 (curriculum)  {_final(stages.get('asr', {}), 'wer')}"]
    if {"align_cps", "align_learned"} <= set(stages):
        out.append("== stages 1 and 2 by text side: WER on held-out voices (test set), same data and steps ==")
        out.append(f"   {'text side':<28} {'stage 1 zero-shot':>22} {'stage 2':>22}")
        for label, one, two in (("CPS (TASU's rules)", "align_cps", "asr_cps"), ("matched CPS + CPS", "align", "asr"),
                                ("learned simulator + CPS", "align_learned", "asr_learned")):
            out.append(f"   {label:<28} {_final(stages.get(one, {}), 'wer'):>22} {_final(stages.get(two, {}), 'wer'):>22}")
    for group, what in ((("distill_nll", "distill_half", "distill"), "stage 3: alpha 0 (NLL), 0.5 and 1 (distillation)"),
                        (("select_uniform", "select"), "stage 4: uniform (gamma 0) vs active (gamma 5) selection")):
        ran = [name for name in group if name in stages and "state" not in stages[name]]  # finished
        if len(ran) < 2:
            continue
        out.append(f"== {what}, held-out (final) ==")
        out.append(f"   {'set':<14} {'':<26}" + "".join(f" {name:>22}" for name in ran))
        set_names = dict.fromkeys(n for name in ran for n in _eval_sets(stages[name]))
        for set_name in set_names:
            for metric, label in SHOWN.items():
                cells = [_final(stages[name], metric, set_name) for name in ran]
                if metric != "wer" and any(c != "-" for c in cells):
                    out.append(f"   {set_name:<14} {label:<26}" + "".join(f" {c:>22}" for c in cells))
    return out + analyses(report)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="pipeline YAML whose run is reported, e.g. configs/pipeline/demo.yaml")
    parser.add_argument("--run-dir", help="root of the run directories (default: the pipeline's run_dir)")
    parser.add_argument("--scale", help="one of the pipeline's scales (default: its first)")


def run(args: argparse.Namespace) -> int:
    print(format_report(build_report(args.pipeline, args.run_dir, args.scale)))
    return 0
