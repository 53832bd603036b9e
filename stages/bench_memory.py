"""Peak memory of the distillation loss, chunked vs unchunked (numbers to read, never asserted).

``python -m stages.bench_memory [--vocab 49152 151936] [--positions 2048] [--hidden 256] [--chunk 1024]``:
for each vocabulary size, a random tiny Llama student and a frozen teacher of the same shape run one
forward + backward of ``lm_loss(alpha=1)`` over ``positions`` positions, once with chunked (checkpointed)
logits and once with all (positions x vocab) logits at once. Each run is a fresh subprocess, so its peak
resident memory (``ru_maxrss``, Linux) above the resident memory after building the models is that run's
own. Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("chunked", "unchunked")


def _tiny_llm(vocab: int, hidden: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=2, intermediate_size=2 * hidden,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _reset_peak_rss_kib() -> int:
    """Resets the process's peak RSS to its current RSS where Linux allows it; returns the new peak (KiB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: the baseline is then the peak so far (building included)
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(vocab: int, mode: str, positions: int, hidden: int, chunk: int, batch: int) -> dict:
    """One forward + backward of the distillation loss in this process -> peak MiB above baseline, seconds."""
    import torch

    from speechllm.losses import lm_loss

    teacher = _tiny_llm(vocab, hidden, seed=0).requires_grad_(False).eval()
    student = _tiny_llm(vocab, hidden, seed=1).train()
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(vocab, (batch, positions // batch), generator=generator)
    targets = torch.randint(vocab, (positions,), generator=generator)
    chunk_size = chunk if mode == "chunked" else 0

    def step(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = ids.numel()
        student_hidden = student.model(input_ids=ids).last_hidden_state.reshape(n, hidden)
        with torch.no_grad():
            teacher_hidden = teacher.model(input_ids=ids).last_hidden_state.reshape(n, hidden)
        out = lm_loss(student_hidden, student.lm_head, targets, teacher_hidden=teacher_hidden,
                      teacher_head=teacher.lm_head, alpha=1.0, chunk_size=chunk_size)
        out["loss"].backward()
        return out["loss"]

    step(ids[:1, :8], targets[:8])  # warm-up: one-time costs (thread pools, kernels) stay out of the timing
    student.zero_grad(set_to_none=True)
    row = {"vocab": vocab, "mode": mode, "chunk": chunk_size, "positions": positions, "hidden": hidden,
           "batch": batch}
    gc.collect()
    baseline_kib = _reset_peak_rss_kib()
    start = time.perf_counter()
    try:
        loss = step(ids, targets)
    except (MemoryError, RuntimeError) as err:  # torch's CPU allocator raises RuntimeError when it cannot
        return {**row, "error": "out of memory" if _is_out_of_memory(err) else f"{type(err).__name__}: {err}"}
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**row, "peak_mib": (peak_kib - baseline_kib) / 1024, "seconds": seconds, "loss": loss.item()}


def _is_out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate" in text


def _measure_in_subprocess(vocab: int, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "stages.bench_memory", "--worker", mode, "--vocab", str(vocab),
           "--positions", str(args.positions), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
           "--batch", str(args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == -9:  # SIGKILL: the kernel's OOM killer
        return {"vocab": vocab, "mode": mode, "error": "out of memory (killed)"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"vocab": vocab, "mode": mode, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'vocab':>8} {'mode':<16} {'peak MiB above baseline':>24} {'seconds':>8}")
    for r in rows:
        mode = f"{r['mode']} ({r['chunk']})" if r.get("chunk") else r["mode"]
        if "error" in r:
            print(f"{r['vocab']:>8} {mode:<16} {r['error']:>24}")
        else:
            print(f"{r['vocab']:>8} {mode:<16} {r['peak_mib']:>24.0f} {r['seconds']:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.bench_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936], help="vocabulary sizes")
    parser.add_argument("--positions", type=int, default=2048, help="text positions in the batch")
    parser.add_argument("--hidden", type=int, default=256, help="LLM hidden size")
    parser.add_argument("--chunk", type=int, default=1024, help="lm_loss chunk_size of the chunked mode")
    parser.add_argument("--batch", type=int, default=4, help="sequences the positions are split into")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/distill_memory.json"))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)  # one measurement, JSON on stdout
    args = parser.parse_args(argv)
    if args.positions % args.batch:
        parser.error(f"--positions {args.positions} must be a multiple of --batch {args.batch}")
    if args.chunk <= 0:
        parser.error(f"--chunk must be > 0, got {args.chunk}")

    if args.worker:
        print(json.dumps(measure(args.vocab[0], args.worker, args.positions, args.hidden, args.chunk, args.batch)))
        return 0
    rows = []
    for vocab in args.vocab:
        for mode in MODES:
            print(f"[bench_memory] vocab {vocab}, {mode} ...", flush=True)
            rows.append(_measure_in_subprocess(vocab, mode, args))
    _print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
