"""The learned posterior simulator (speechllm/simulator.py) and its training (stages/prepare_simulator.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from speechllm.simulator import (
    MAX_INSERTED,
    PosteriorSimulator,
    correct_errors,
    decode_vectors,
    pair_targets,
    spread_targets,
)
from stages.prepare_simulator import achieved_wer, calibrate, spell, train_simulator

V = 12  # blank + 11 units
UNITS = ["<blank>", " ", *"abcdefghij"]


def peaky(units: list[int], peak: float = 0.8) -> torch.Tensor:
    """Rows with ``peak`` on each unit and the rest spread evenly."""
    rows = torch.full((len(units), V), (1 - peak) / (V - 1))
    rows[torch.arange(len(units)), torch.tensor(units)] = peak
    return rows


def test_pair_targets_on_a_hand_alignment():
    # ref a b c d; the encoder emitted a, b, an inserted y, c, then x for d.
    a, b, c, d, x, y = 2, 3, 4, 5, 7, 8
    t = pair_targets([a, b, c, d], peaky([a, b, y, c, x], 0.7))
    assert t["observed"].tolist() == [a, b, c, x] and t["error"].tolist() == [0, 0, 0, 1]
    assert t["inserted"].tolist() == [0, 1, 0, 0] and t["insert_unit"].tolist() == [-100, y, -100, -100]
    assert torch.allclose(t["peak"], torch.full((4,), 0.7))
    spread = spread_targets(peaky([a, b, y, c, x], 0.7), t["aligned"])
    assert t["aligned"].tolist() == [0, 1, 3, 4]
    assert torch.allclose(spread.sum(-1), torch.ones(4)) and (spread[0, a] == 0)
    assert torch.allclose(spread[3], peaky([x], 0.7)[0].scatter(0, torch.tensor([x]), 0.0) / 0.3)
    # b deleted; two insertions before the first unit count at position 0; more than MAX are capped.
    t = pair_targets([a, b, c], peaky([a, c]))
    assert t["observed"].tolist() == [a, V, c] and t["peak"][1] == 0
    assert spread_targets(peaky([a, c]), t["aligned"])[1].sum() == 0
    assert t["error"].tolist() == [0, 1, 0]
    t = pair_targets([a, b], peaky([y, y, y, a, b]))
    assert t["observed"].tolist() == [a, b]
    assert t["inserted"].tolist() == [MAX_INSERTED, 0] and t["insert_unit"][0] == y


def test_correct_errors_undoes_the_requested_share_of_errors_and_keeps_vector_shapes():
    a, b, c, d, x, y = 2, 3, 4, 5, 7, 8
    ref = [a, 1, b, c, 1, d]
    real = peaky([a, 1, y, x, c, 1], 0.6)  # b -> y, x inserted, d deleted
    g = torch.Generator().manual_seed(0)
    assert torch.equal(correct_errors(ref, real, 0.0, g), real)
    fixed = correct_errors(ref, real, 1.0, g)
    assert decode_vectors(fixed, UNITS, 0) == spell(ref, UNITS, 0)
    assert torch.equal(fixed[2].sort().values, real[2].sort().values)  # b's vector: y's, its two units swapped
    assert torch.allclose(fixed.sum(-1), torch.ones(len(fixed)))


def test_decode_vectors_reads_one_unit_per_vector_and_drops_blanks():
    assert decode_vectors(peaky([2, 2, 0, 1, 3]), UNITS, 0) == "aa b"  # no CTC collapse: LSD already merged
    assert spell([2, 1, 3], UNITS, 0) == "a b"
    assert decode_vectors(torch.zeros(0, V), UNITS, 0) == ""


def _model(seed=0, **kw) -> PosteriorSimulator:
    torch.manual_seed(seed)
    return PosteriorSimulator(V, 0, dim=32, layers=1, heads=2, max_len=32, grid=11, **kw).eval()


def test_simulated_rows_are_distributions_and_deterministic_per_seed():
    sim = _model()
    ids = torch.tensor([2, 3, 1, 4, 5, 1, 6])
    runs = [sim.simulate(ids, 0.3, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2]) if runs[0].shape == runs[2].shape else True
    for rows in runs:
        assert rows.shape[1] == V and (rows >= 0).all()
        assert torch.allclose(rows.sum(-1), torch.ones(len(rows)), atol=1e-5)
    assert sim.simulate(torch.tensor([], dtype=torch.long), 0.2).shape == (0, V)


def test_condition_for_inverts_the_calibration_curve():
    sim = _model(calibration={"condition": [0.0, 0.5, 1.0], "achieved": [0.1, 0.3, 0.9]})
    assert sim.condition_for(0.05) == 0.0
    assert sim.condition_for(0.2) == pytest.approx(0.25)
    assert sim.condition_for(0.6) == pytest.approx(0.75)
    assert sim.condition_for(0.95) == 1.0
    assert _model().condition_for(0.37) == pytest.approx(0.37)  # uncalibrated: the request itself


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Utterances of 3-8 words whose units are substituted, deleted or followed by an insertion, each
    with probability rising with the utterance's difficulty; the pair's label is its measured WER."""
    rng = random.Random(seed)
    pairs = []
    for k in range(n):
        words = [[rng.randint(2, V - 1) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(3, 8))]
        ids = [u for i, w in enumerate(words) for u in ([1] if i else []) + w]
        difficulty = rng.random() * 0.6
        out = []
        for u in ids:
            r = rng.random()
            if u == 1 or r > difficulty:
                out.append(u)
            elif r < difficulty / 2:
                out.append(rng.randint(2, V - 1))
            elif r > 3 * difficulty / 4:
                out += [u, rng.randint(2, V - 1)]
        vectors = peaky(out) if out else torch.zeros(0, V)
        wer = __import__("speechllm.metrics", fromlist=["word_errors"]).word_errors(
            spell(ids, UNITS, 0), decode_vectors(vectors, UNITS, 0)).wer
        pairs.append({"ids": ids, "vectors": vectors, "wer": wer, "clip": k, "copy": 0})
    return pairs


def test_the_requested_difficulty_moves_the_achieved_wer_monotonically(tmp_path: Path):
    torch.manual_seed(0)
    sim = PosteriorSimulator(V, 0, dim=48, layers=1, heads=2, max_len=32, grid=11)
    history = train_simulator(sim, synthetic_pairs(600, 0), steps=300, batch_size=32, lr=3e-3, seed=0,
                              state_path=tmp_path / "state.pt", checkpoint_every=1000)
    assert history[-1]["total"] < history[0]["total"]
    held_out = [p["ids"] for p in synthetic_pairs(150, 1)]
    achieved = [achieved_wer(sim, held_out, c, UNITS, seed=3) for c in (0.0, 0.2, 0.4, 0.6)]
    assert achieved == sorted(achieved) and len(set(achieved)) == 4 and achieved[-1] - achieved[0] > 0.2, achieved
    curve = calibrate(sim, held_out[:60], UNITS, seed=4)
    assert curve["achieved"] == sorted(curve["achieved"]) and len(curve["condition"]) == len(curve["achieved"])


def test_training_resumes_from_its_checkpoint_exactly(tmp_path: Path):
    pairs = synthetic_pairs(80, 2)

    def trained(steps: int, state: Path) -> PosteriorSimulator:
        torch.manual_seed(0)
        sim = PosteriorSimulator(V, 0, dim=16, layers=1, heads=2, max_len=32, grid=5)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            train_simulator(sim, pairs, steps=steps, batch_size=8, lr=1e-3, seed=0, state_path=state, checkpoint_every=10)
        return sim

    whole = trained(30, tmp_path / "a.pt")  # leaves its last checkpoint, of step 20, behind
    resumed = trained(30, tmp_path / "a.pt")  # as a run killed after step 20 would: resumes there
    assert torch.load(tmp_path / "a.pt", weights_only=False)["step"] == 20
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


def test_prepare_simulator_then_both_stages_read_text_through_it(tmp_path: Path, tiny_data: Path):
    """The asset step on the tiny pipeline (its random CTC encoder's real output on noise clips), a
    re-run that reuses it, then stage 1 and stage 2 with ``text_side: learned`` (stage 2 ramping the
    requested WER)."""
    import json
    import subprocess
    import sys

    from stages.tensorboard import scalar_series

    repo = Path(__file__).resolve().parents[1]
    simulator = tmp_path / "simulator"
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(f"""
name: sim
include: ["{repo / 'configs/model/tiny.yaml'}"]
defaults:
  model: {{encoder: {{text_side: learned, cps: {{simulator: "{simulator}", wer_min: 0.0, wer_max: 0.4}}}}}}
  data: {{batch_size: 4, val_batch_size: 4}}
  trainer: {{accelerator: cpu, precision: 32-true, max_steps: 6, val_check_interval: 100,
             checkpoint_every_n_steps: 3, log_every_n_steps: 1, num_threads: 1}}
stages:
  - name: align
    config:
      kind: align
      data: {{train: "{tiny_data / 'text/train.jsonl'}", val: {{noise: "{tiny_data / 'speech/val.jsonl'}"}}}}
  - name: asr
    config:
      kind: asr
      init_from: align
      data:
        sources:
          simulated: {{manifest: "{tiny_data / 'text/train.jsonl'}", kind: simulated}}
        difficulty: {{wer_max: {{kind: linear, start: 0.1, end: 0.5, end_step: 6}}}}
        val: {{noise: "{tiny_data / 'speech/val.jsonl'}"}}
""")
    prepare = [sys.executable, "-m", "stages", "prepare", "simulator", "--pipeline", str(pipeline),
               "--manifest", str(tiny_data / "speech/train.jsonl"), "--heldout", str(tiny_data / "speech/val.jsonl"),
               "--copies", "1", "--steps", "20", "--batch-size", "8", "--dim", "32", "--layers", "1",
               "--checkpoint-every", "10", "--threads", "1"]
    done = subprocess.run(prepare, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((simulator / "report.json").read_text())
    assert [b["requested"] for b in report["bins"]][:2] == [0.0, 0.1] and report["train_pairs"] > 0
    assert (simulator / "posteriorgram.png").is_file() and scalar_series(simulator / "tensorboard", "simulator/achieved_wer")
    again = subprocess.run(prepare, capture_output=True, text=True, timeout=600)
    assert "already at" in again.stdout

    run = subprocess.run([sys.executable, "-m", "stages", "run", str(pipeline), "--run-dir", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    ramp = scalar_series(tmp_path / "runs/sim/asr/tb", "curriculum/cps/wer_max")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(tmp_path / "runs/sim/align/tb"), size_guidance={"images": 0, "tensors": 0})
    logged.Reload()
    assert "simulator/posteriorgram" in logged.Tags()["images"]
    assert any("simulator/requested_vs_achieved" in tag for tag in logged.Tags()["tensors"])
    assert ramp == pytest.approx({step: 0.1 + 0.4 * step / 6 for step in range(6)}, abs=1e-6)
