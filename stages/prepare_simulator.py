"""``python -m stages prepare simulator``: train the learned posterior simulator (``text_side: learned``).

1. **Pairs.** Every clip of the ``--manifest`` speech (training voices, and real speech where the data
   has it) goes through the pipeline's CTC encoder, clean and as ``--copies`` augmented copies (noise,
   reverberation, speed, telephone band, gain; seeded per clip and copy), so the pairs span easy to hard
   utterances; each pair is (reference units, the real LSD output, its greedy WER). A weak encoder is
   rarely right, so ``--corrected`` easier versions of each output (a random share of its errors
   undone, :func:`speechllm.simulator.correct_errors`) fill the low difficulties.
2. **Training** (:class:`speechllm.simulator.PosteriorSimulator`, conditioned on each pair's WER), with a
   checkpoint every ``--checkpoint-every`` steps that a re-run resumes from.
3. **Calibration** on the pairs held out of training (a tenth of the clips, all their copies): the greedy
   WER each difficulty achieves, which the simulator inverts for a requested WER.
4. **Evaluation** on ``--heldout`` sentences: requested vs achieved greedy WER per bin, before and after
   calibration, in ``report.json`` and TensorBoard (``<out>/tensorboard``), with a figure of a real and
   a simulated posteriorgram of one held-out sentence (``posteriorgram.png``).

Everything is keyed by the encoder (Whisper, its CTC head, LSD), the data and the settings: a re-run with
the same key returns the saved report.

    python -m stages prepare simulator --pipeline configs/pipeline/demo.yaml \\
        --manifest data/demo/speech/train.jsonl --heldout data/demo/speech/test.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from speechllm.config import ConfigError, TextSide
from speechllm.encoders import build_encoder
from speechllm.io import atomic_folder, atomic_open
from speechllm.manifest import load_audio, load_manifest
from speechllm.metrics import ErrorCounts, word_errors
from speechllm.simulator import (
    PosteriorSimulator,
    bins_table,
    correct_errors,
    decode_vectors,
    pair_targets,
    spread_targets,
)
from stages.runner import resolve_stage_configs

log = logging.getLogger(__name__)

REQUESTED_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
CALIBRATION_GRID = [round(0.05 * i, 2) for i in range(21)]
SIMULATOR_FILES = ("simulator.json", "simulator.safetensors", "report.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="the encoder comes from this pipeline's stage")
    parser.add_argument("--stage", default="align", help="that stage (default: %(default)s)")
    parser.add_argument("--scale", help="one of the pipeline's scales (default: its first)")
    parser.add_argument("--manifest", required=True, action="append",
                        help="speech to learn from: TRAINING voices or real training speech (repeatable)")
    parser.add_argument("--heldout", required=True, help="held-out sentences (a manifest; texts are read) for the "
                        "requested vs achieved WER, and its first clip for the posteriorgram figure")
    parser.add_argument("--limit", type=int, default=0, help="clips per manifest (0 = all)")
    parser.add_argument("--copies", type=int, default=2, help="augmented copies of each clip besides the clean one")
    parser.add_argument("--corrected", type=int, default=1,
                        help="easier versions of each real output, a random share of its errors undone (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="utterances per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=192, help="model width (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=3, help="transformer layers (default: %(default)s)")
    parser.add_argument("--checkpoint-every", type=int, default=250, help="steps between resumable checkpoints")
    parser.add_argument("--heldout-limit", type=int, default=200, help="held-out sentences scored (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="model init, augmentation and sampling (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the stage config")


def _file_hash(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def spell(ids: list[int], units: list[str], blank_id: int) -> str:
    """The text reference units spell (as :func:`decode_vectors` spells one-hot rows)."""
    return decode_vectors(torch.nn.functional.one_hot(torch.tensor(ids, dtype=torch.long), len(units)).float()
                          if ids else torch.zeros(0, len(units)), units, blank_id)


# ---------------------------------------------------------------------------------------------------
# 1. Pairs
# ---------------------------------------------------------------------------------------------------


def collect_pairs(encoder, manifests: list[str], limit: int, copies: int, seed: int, corrected: int = 1,
                  batch_size: int = 16, max_seconds: float = 30.0) -> list[dict]:
    """(clip, copy, version) -> {"ids", "vectors", "wer", "clip", "copy", "corrected"}; copy 0 is the clean
    clip, version 0 the encoder's real output, versions 1.. have a random share of its errors undone."""
    from speechllm.augment import AugmentConfig, augment_seeded

    augment_cfg = AugmentConfig(prob=1.0)
    units, blank = encoder.vocab.units, encoder.vocab.blank_id
    items, too_long = [], 0
    for manifest in manifests:
        found = load_manifest(manifest, require_audio=True)
        found = found[:limit] if limit else found
        kept = [u for u in found if (u.duration or 0.0) <= max_seconds]
        too_long += len(found) - len(kept)
        items += kept
    if too_long:
        log.warning("%d clips longer than %.0f s skipped (the encoder's window)", too_long, max_seconds)
    # Longest first and batched by length: little padding in the encoder, and a slow start that shows.
    order = sorted(range(len(items)), key=lambda k: -(items[k].duration or 0.0))
    work = [(k, copy) for k in order for copy in range(copies + 1)]
    pairs, skipped = [], 0
    bar = tqdm(total=len(work), desc="simulator pairs", unit="clip")
    for start in range(0, len(work), batch_size):
        chunk = work[start : start + batch_size]
        waves = []
        for k, copy in chunk:
            wave = load_audio(items[k].audio, encoder.sample_rate)
            waves.append(wave if copy == 0 else augment_seeded(wave, encoder.sample_rate, augment_cfg,
                                                               seed * 1_000_003 + k * 101 + copy))
        feats, lengths = encoder.encode_speech(waves)
        for (k, copy), row, length in zip(chunk, feats, lengths.tolist()):
            ids = encoder.vocab.encode(items[k].text)
            if not ids:
                skipped += 1
                continue
            real = row[:length].float().cpu()
            g = torch.Generator().manual_seed(seed * 1_000_003 + k * 101 + copy + 50)
            # The real output, and ``corrected`` easier versions of it (some of its errors undone).
            for version in range(corrected + 1):
                vectors = real if version == 0 else correct_errors(ids, real, float(torch.rand((), generator=g)), g)
                wer = word_errors(spell(ids, units, blank), decode_vectors(vectors, units, blank)).wer
                pairs.append({"ids": ids, "vectors": vectors.half(), "wer": float(wer), "clip": k, "copy": copy,
                              "corrected": version > 0})
        bar.update(len(chunk))
    bar.close()
    if skipped:
        log.warning("%d clips skipped: their text spells no CTC unit", skipped)
    return pairs


def _batch(pairs: list[dict], vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    targets = [{**p["targets"], "spread": spread_targets(p["vectors"], p["targets"]["aligned"])} for p in pairs]
    lengths = torch.tensor([len(p["ids"]) for p in pairs])
    length = int(lengths.max())
    ids = torch.zeros(len(pairs), length, dtype=torch.long)
    for i, p in enumerate(pairs):
        ids[i, : len(p["ids"])] = torch.tensor(p["ids"])
    fill = {"observed": vocab, "aligned": -1, "inserted": 0, "insert_unit": -100, "peak": 0.0}
    batched = {}
    for name in targets[0]:
        shape = (len(pairs), length, *targets[0][name].shape[1:])
        out = torch.full(shape, fill.get(name, 0.0), dtype=targets[0][name].dtype)
        for i, t in enumerate(targets):
            out[i, : len(t[name])] = t[name]
        batched[name] = out
    return ids, lengths, torch.tensor([min(p["wer"], 1.0) for p in pairs]), batched


# ---------------------------------------------------------------------------------------------------
# 2. Training (resumable)
# ---------------------------------------------------------------------------------------------------


def train_simulator(sim: PosteriorSimulator, pairs: list[dict], *, steps: int, batch_size: int, lr: float, seed: int,
                    state_path: Path, checkpoint_every: int, writer=None) -> list[dict]:
    """AdamW with warmup and cosine decay; resumes from ``state_path`` where it exists."""
    opt = torch.optim.AdamW(sim.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    # Each pair's alignment once (pair_targets is Python), not at every draw.
    pairs = [{**p, "targets": pair_targets(p["ids"], p["vectors"])}
             for p in tqdm(pairs, desc="simulator targets", unit="pair")]
    rng = random.Random(seed)
    step, history = 0, []
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        sim.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        step, history = state["step"], state["history"]
        log.info("resuming the simulator's training at step %d of %d", step, steps)
    sim.train()
    bar = tqdm(total=steps, initial=step, desc="simulator training", unit="step")
    while step < steps:
        ids, lengths, wer, targets = _batch(rng.sample(pairs, min(batch_size, len(pairs))), sim.vocab_size)
        parts = sim.loss(sim(ids, lengths, wer), targets, lengths)
        opt.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(sim.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if writer is not None:
            for name, value in parts.items():
                writer.add_scalar(f"simulator/loss/{name}", float(value), step)
        if step % 50 == 0 or step == steps:
            history.append({"step": step, **{k: round(float(v), 4) for k, v in parts.items()}})
            bar.set_postfix(loss=f"{float(parts['total']):.3f}")
        if step % checkpoint_every == 0 and step < steps:
            with atomic_open(state_path, "wb") as f:
                torch.save({"model": sim.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "step": step,
                            "history": history}, f)
        bar.update(1)
    bar.close()
    sim.eval()
    return history


# ---------------------------------------------------------------------------------------------------
# 3-4. Calibration and evaluation
# ---------------------------------------------------------------------------------------------------


def achieved_wer(sim: PosteriorSimulator, id_lists: list[list[int]], condition: float, units: list[str],
                 seed: int) -> float:
    """Corpus greedy WER of simulated posteriors of ``id_lists`` at one difficulty (seeded per sentence)."""
    total = ErrorCounts()
    for k, ids in enumerate(id_lists):
        g = torch.Generator().manual_seed(seed * 7919 + k)
        rows = sim.simulate(torch.tensor(ids), condition, g)
        total = total + word_errors(spell(ids, units, sim.meta["blank_id"]), decode_vectors(rows, units, sim.meta["blank_id"]))
    return total.wer


def calibrate(sim: PosteriorSimulator, id_lists: list[list[int]], units: list[str], seed: int) -> dict:
    """The achieved WER at each grid difficulty, made non-decreasing (so it can be inverted)."""
    achieved = [achieved_wer(sim, id_lists, c, units, seed) for c in tqdm(CALIBRATION_GRID, desc="calibration", unit="point")]
    monotone = [max(achieved[: i + 1]) for i in range(len(achieved))]
    return {"condition": CALIBRATION_GRID, "achieved": [round(a, 4) for a in monotone],
            "measured": [round(a, 4) for a in achieved], "sentences": len(id_lists)}


def posteriorgram_figure(real: torch.Tensor, simulated: torch.Tensor, units: list[str], title: str):
    """Two panels (real above, simulated below): probability of the units either one uses, per vector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = sorted(set(real.argmax(-1).tolist()) | set(simulated.argmax(-1).tolist()))
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharey=True)
    for ax, rows, name in zip(axes, (real, simulated), ("real LSD output", "learned simulator")):
        ax.imshow(rows[:, used].T.float().numpy(), aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("vector")
    axes[0].set_yticks(range(len(used)), [repr(units[u]) for u in used], fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _mean_wer(pairs: list[dict]) -> float:
    return round(sum(p["wer"] for p in pairs) / max(len(pairs), 1), 4)


# ---------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    stages = resolve_stage_configs(args.pipeline, args.overrides, None, args.scale)
    cfg = next((c for name, _, c in stages if name == args.stage), None)
    if cfg is None:
        raise ConfigError(f"{args.pipeline}: no stage {args.stage!r} (have {[name for name, _, _ in stages]})")
    enc = cfg.model.encoder
    if not enc.cps.simulator:
        raise ConfigError(f"{args.pipeline}: stage {args.stage!r} sets no model.encoder.cps.simulator path")
    out = Path(enc.cps.simulator)
    head = Path(enc.ctc_head) / "head.safetensors" if enc.ctc_head else None
    settings = {k: getattr(args, k) for k in ("limit", "copies", "corrected", "steps", "batch_size", "lr", "dim", "layers", "seed",
                                             "heldout_limit")}
    pairs_key = hashlib.sha1(json.dumps({
        "encoder": str(enc.pretrained), "lsd": [enc.lsd, enc.lsd_blank_threshold],
        "head": _file_hash(head) if head and head.is_file() else None,
        "manifests": [_file_hash(m) for m in args.manifest],
        **{k: settings[k] for k in ("limit", "copies", "corrected", "seed")}}).encode()).hexdigest()
    key = hashlib.sha1(json.dumps({"pairs": pairs_key, "heldout": _file_hash(args.heldout), "settings": settings,
                                   "model": PosteriorSimulator.VERSION}).encode()).hexdigest()
    if all((out / f).is_file() for f in SIMULATOR_FILES) and json.loads((out / "report.json").read_text()).get("key") == key:
        print(f"posterior simulator already at {out}")
        return 0

    enc.text_side = TextSide.cps  # measuring the encoder, not simulating
    encoder = build_encoder(enc)
    units, blank = encoder.vocab.units, encoder.vocab.blank_id
    work = out.parent / f".{out.name}.work-{key[:10]}"  # pairs and the training state survive a kill
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pairs_path = out.parent / f".{out.name}.pairs-{pairs_key[:10]}.pt"  # reused by runs that differ in training only
    if pairs_path.is_file():
        pairs = torch.load(pairs_path, weights_only=False)
    else:
        pairs = collect_pairs(encoder, args.manifest, args.limit, args.copies, args.seed, args.corrected,
                              max_seconds=cfg.data.max_audio_seconds)
        with atomic_open(pairs_path, "wb", fsync=False) as f:
            torch.save(pairs, f)
    pairs_seconds = time.perf_counter() - start
    if not pairs:
        raise ValueError(f"{args.manifest}: no usable clip (every text spells no CTC unit)")
    calibration_clips = {p["clip"] for p in pairs if hashlib.sha1(f"{p['clip']}".encode()).digest()[0] < 26}
    train_pairs = [p for p in pairs if p["clip"] not in calibration_clips]
    calibration_ids = [p["ids"] for p in pairs if p["clip"] in calibration_clips and p["copy"] == 0 and not p["corrected"]]

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(work / "tensorboard"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        sim = PosteriorSimulator(len(units), blank, dim=args.dim, layers=args.layers)
        start = time.perf_counter()
        history = train_simulator(sim, train_pairs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  seed=args.seed, state_path=work / "train-state.pt",
                                  checkpoint_every=args.checkpoint_every, writer=writer)
    train_seconds = time.perf_counter() - start

    sim.meta["calibration"] = calibrate(sim, calibration_ids, units, args.seed + 1)
    heldout = load_manifest(args.heldout, require_audio=False)[: args.heldout_limit]
    heldout_ids = [ids for ids in (encoder.vocab.encode(u.text) for u in heldout) if ids]
    bins = []
    for wer in REQUESTED_BINS:
        calibrated = achieved_wer(sim, heldout_ids, sim.condition_for(wer), units, args.seed + 2)
        uncalibrated = achieved_wer(sim, heldout_ids, wer, units, args.seed + 2)
        bins.append({"requested": wer, "achieved": round(calibrated, 4), "achieved_uncalibrated": round(uncalibrated, 4),
                     "condition": round(sim.condition_for(wer), 4)})
        writer.add_scalar("simulator/achieved_wer", calibrated, round(wer * 100))
        writer.add_scalar("simulator/achieved_wer_uncalibrated", uncalibrated, round(wer * 100))
    table = bins_table(bins)
    writer.add_text("simulator/requested_vs_achieved", table)

    # The figure: the first held-out clip with audio, real vs simulated at its own measured WER.
    figure = None
    first = next((u for u in heldout if u.audio and Path(u.audio).is_file()), None)
    if first is not None and encoder.vocab.encode(first.text):
        feats, lengths = encoder.encode_speech([load_audio(first.audio, encoder.sample_rate)])
        real = feats[0, : int(lengths[0])].float()
        ids = encoder.vocab.encode(first.text)
        real_wer = word_errors(spell(ids, units, blank), decode_vectors(real, units, blank)).wer
        simulated = sim.simulate(torch.tensor(ids), sim.condition_for(real_wer), torch.Generator().manual_seed(args.seed))
        fig = posteriorgram_figure(real, simulated, units, f"{first.text!r} (real greedy WER {real_wer:.2f}; "
                                   f"simulated at that WER: {decode_vectors(simulated, units, blank)!r})")
        writer.add_figure("simulator/posteriorgram", fig)
        figure = {"id": first.id, "text": first.text, "real_wer": round(real_wer, 4),
                  "real": decode_vectors(real, units, blank), "simulated": decode_vectors(simulated, units, blank)}
    writer.close()

    wers = sorted(p["wer"] for p in train_pairs)
    report = {
        "key": key, "settings": settings, "pairs": len(pairs), "train_pairs": len(train_pairs),
        "calibration_sentences": len(calibration_ids), "manifests": args.manifest, "heldout": args.heldout,
        "heldout_sentences": len(heldout_ids),
        "pair_wer": {"mean": _mean_wer(train_pairs), "quartiles": [round(wers[len(wers) * q // 4], 4) for q in (1, 2, 3)],
                     "real": _mean_wer([p for p in train_pairs if not p["corrected"]]),
                     "real_by_copy": {str(c): _mean_wer([p for p in train_pairs if p["copy"] == c and not p["corrected"]])
                                      for c in range(args.copies + 1)}},
        "pairs_seconds": round(pairs_seconds, 1), "train_seconds": round(train_seconds, 1),
        "parameters": sum(p.numel() for p in sim.parameters()), "history": history,
        "calibration": sim.meta["calibration"], "bins": bins, "figure": figure,
    }
    with atomic_folder(out) as tmp:
        sim.save(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        if figure is not None:
            fig.savefig(tmp / "posteriorgram.png", dpi=110)
        shutil.copytree(work / "tensorboard", tmp / "tensorboard")
    shutil.rmtree(work, ignore_errors=True)
    pairs_path.unlink(missing_ok=True)
    print(f"posterior simulator -> {out}: {len(train_pairs)} training pairs (mean WER {report['pair_wer']['mean']:.3f}, "
          f"real outputs {report['pair_wer']['real']:.3f}), {train_seconds:.0f} s training\n{table}")
    return 0
