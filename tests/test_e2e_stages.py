"""Stages 2-4 end to end through the runner on tiny models: SIGKILL and exact resume, and the whole
pipeline on two processes (DDP, and FSDP, over gloo) producing what one process produces."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hand_reference import word_edits

from stages.faults import wait_for_checkpoint
from stages.tensorboard import scalar_series

REPO = Path(__file__).resolve().parents[1]


def pipeline_for(tmp_path: Path, data: Path) -> Path:
    """configs/pipeline/tiny.yaml pointed at this test's data."""
    text = (REPO / "configs/pipeline/tiny.yaml").read_text().replace("data/tiny/", f"{data}/")
    text = text.replace("../model/", f"{REPO}/configs/model/").replace("../stage/", f"{REPO}/configs/stage/")
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def command(pipeline: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stages", "run", str(pipeline), "--run-dir", str(run_dir), "trainer.num_threads=1", *extra]


@pytest.mark.parametrize("stage", ["asr", "distill", "select"])
def test_stage_resumes_exactly_after_sigkill(stage, tmp_path, tiny_data):
    steps = 16
    pipeline = pipeline_for(tmp_path, tiny_data)
    extra = ("--only", stage, "init_from=null", f"trainer.max_steps={steps}", "trainer.val_check_interval=16",
             "trainer.checkpoint_every_n_steps=4", "trainer.evaluate_before_training=false")
    killed = tmp_path / "killed"
    stage_dir = killed / "tiny" / stage
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command(pipeline, killed, *extra), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, stage_dir, 8, timeout=600)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(stage_dir / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert 8 <= saved < steps and not (stage_dir / "DONE").exists()

    rerun = subprocess.run(command(pipeline, killed, *extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout and (stage_dir / "DONE").is_file()
    clean = subprocess.run(command(pipeline, tmp_path / "clean", *extra), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=900)
    assert clean.returncode == 0, clean.stderr[-3000:]
    resumed, uninterrupted = scalar_series(stage_dir / "tb"), scalar_series(tmp_path / "clean" / "tiny" / stage / "tb")
    assert set(resumed) == set(uninterrupted) == set(range(steps))
    for step in range(steps):
        assert abs(resumed[step] - uninterrupted[step]) <= 1e-6, (step, resumed[step], uninterrupted[step])


def stage_outputs(stage: Path) -> dict:
    metrics = json.loads((stage / "metrics.json").read_text())
    return {"files": sorted(p.name for p in stage.iterdir() if p.name not in ("tb",)),
            "model": sorted(p.name for p in (stage / "model").iterdir()),
            "metrics": sorted(k for k in metrics if not k.startswith("train_loss_curve")),
            "steps": metrics["steps"]}


# No weight moves (both learning rates 0), so the two runs hold the same model at every stage and
# every evaluation must agree; what may differ is only which batches each rank trained on.
WHOLE = ("trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.checkpoint_every_n_steps=2",
         "optim.lr=0", "optim.lr_llm=0")
# Evaluations before and after training, and the counted skips; values agree to float round-off
# (batches of other compositions: seen within 2e-6 relative).
AGREEING = ("initial/", "val/", "test/", "skipped/")
TOLERANCE = dict(rel=1e-4, abs=1e-6)


def run_whole_pipeline(pipeline: Path, run_dir: Path, devices: int, *extra: str) -> Path:
    proc = subprocess.run(command(pipeline, run_dir, *WHOLE, f"trainer.devices={devices}", "trainer.collective_timeout_s=120",
                                  *extra),
                          cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "tiny"


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_data) -> tuple[Path, Path]:
    """The whole tiny pipeline on one process: (pipeline file, run directory)."""
    root = tmp_path_factory.mktemp("whole")
    pipeline = pipeline_for(root, tiny_data)
    return pipeline, run_whole_pipeline(pipeline, root / "devices1", 1)


def agreeing_values(stage: Path) -> dict[str, float]:
    metrics = json.loads((stage / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k.startswith(AGREEING)}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_stage_runs_on_two_processes_like_on_one(strategy, tmp_path, one_process_run):
    pipeline, one_run = one_process_run
    two_run = run_whole_pipeline(pipeline, tmp_path / "devices2", 2, f"trainer.strategy={strategy}")
    for stage in ("align", "asr", "distill", "select"):
        one, two = stage_outputs(one_run / stage), stage_outputs(two_run / stage)
        assert one == two, stage
        assert "DONE" in two["files"] and "trainable.safetensors" in two["model"]
        values = agreeing_values(one_run / stage)
        assert any(k.startswith("initial/") for k in values), stage  # each stage evaluated before training
        assert agreeing_values(two_run / stage) == pytest.approx(values, **TOLERANCE), stage
    # M and F are measured (not zero) where they are compared.
    assert json.loads((one_run / "distill/metrics.json").read_text())["initial/val/heldout/M"] > 1e-4
    # Two ranks share the probing: the same M per cluster, so the same selection.
    reports = [json.loads((run / "select/selection/report.json").read_text()) for run in (one_run, two_run)]
    by_cluster = [{c["cluster"]: (c["M"], c["p_target"], c["selected"]) for c in r["clusters"]} for r in reports]
    assert set(by_cluster[0]) == set(by_cluster[1]) and max(m for m, _, _ in by_cluster[0].values()) > 1e-4
    for cluster, (m, p_target, selected) in by_cluster[0].items():
        assert by_cluster[1][cluster] == (pytest.approx(m, **TOLERANCE), pytest.approx(p_target, **TOLERANCE), selected)
    selected = [[json.loads(line)["id"] for line in (run / "select/selection/synthetic/selected.jsonl").open()]
                for run in (one_run, two_run)]
    assert selected[0] == selected[1]


def corpus_wer_by_hand(refs: list[str], hyps: list[str]) -> float:
    from speechllm.metrics import normalize

    pairs = [(normalize(r, "whisper"), normalize(h, "whisper")) for r, h in zip(refs, hyps)]
    return sum(word_edits(r, h) for r, h in pairs) / sum(len(r.split()) for r, _ in pairs)


@torch.no_grad()
def baselines_by_hand(model, manifest: Path) -> tuple[float, float, list[str]]:
    """The report's two reference points recomputed another way: CTC greedy by argmax, collapse and
    blank removal; the LLM's ceiling by a plain greedy loop over the transcript in the speech slot."""
    import itertools

    import soundfile as sf

    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    refs, ctc_hyps, llm_hyps = [r["text"] for r in rows], [], []
    enc, tok = model.encoder, model.tokenizer
    for row in rows:
        wav, _ = sf.read(manifest.parent / row["audio"], dtype="float32")
        probs, lengths = enc.posteriors([torch.from_numpy(wav)])
        best = [u for u, _ in itertools.groupby(probs[0, : int(lengths[0])].argmax(-1).tolist()) if u != enc.blank_id]
        ctc_hyps.append(" ".join("".join(enc.vocab.units[u] for u in best).split()))
        ids = model.prompt.prefix_ids + tok(row["text"], add_special_tokens=False).input_ids + model.prompt.suffix_ids
        new: list[int] = []
        while len(new) < model.cfg.generation.max_new_tokens and (not new or new[-1] != model.eos_id):
            new.append(int(model.llm(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        llm_hyps.append(tok.decode(new, skip_special_tokens=True).strip())
    return corpus_wer_by_hand(refs, ctc_hyps), corpus_wer_by_hand(refs, llm_hyps), llm_hyps


def test_report_covers_every_stage_and_the_baselines(one_process_run, tiny_data):
    from speechllm.model import SpeechLLM
    from stages.runner import resolve_stage_configs

    pipeline, run = one_process_run
    proc = subprocess.run([sys.executable, "-m", "stages", "report", str(pipeline), "--run-dir", str(run.parent)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert set(report["stages"]) == {"align", "asr", "distill", "select"}
    for stage, metrics in report["stages"].items():
        assert f"-- {stage} (" in proc.stdout
        saved = json.loads((run / stage / "metrics.json").read_text())
        assert saved.pop("report")["baselines"] == report["baselines"]
        assert metrics == saved  # each stage's own numbers, unchanged
    align = report["stages"]["align"]
    assert (f"noise          WER                        {align['initial/test/noise/wer']:.3f} "
            f"[{align['initial/test/noise/wer_low']:.3f}, {align['initial/test/noise/wer_high']:.3f}] -> "
            f"{align['test/noise/wer']:.3f} [{align['test/noise/wer_low']:.3f}, {align['test/noise/wer_high']:.3f}]") in proc.stdout
    # The baselines (the frozen encoder and LLM of the stage configs) against a recount by hand.
    cfg = next(c for name, _, c in resolve_stage_configs(pipeline, [], str(run.parent)) if name == "align")
    ctc_wer, ceiling_wer, ceiling_hyps = baselines_by_hand(SpeechLLM.build(cfg.model).eval(), tiny_data / "speech/val.jsonl")
    base = report["baselines"]["noise"]
    assert base["utterances"] == 8
    assert base["ctc_greedy_wer"] == pytest.approx(ctc_wer, abs=1e-9) and ctc_wer > 0
    assert base["llm_text_ceiling_wer"] == pytest.approx(ceiling_wer, abs=1e-9)
    assert [e["hyp"] for e in base["llm_text_ceiling_examples"]] == ceiling_hyps[:3]
    assert f"CTC encoder alone, greedy            WER {ctc_wer:.3f}" in proc.stdout
    assert "-- select: selection (gamma" in proc.stdout and "selected topics:" in proc.stdout
