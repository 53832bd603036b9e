"""The loss's own peak memory at large vocabularies, chunked vs naive (numbers to read, never asserted).

``python -m stages.bench_memory [--vocab 49152 151936] [--positions 2048] [--hidden 1536] [--chunk 256 1024]``:
for each vocabulary size and each loss (``distill``: ``lm_loss(alpha=1)``, forward KL against a teacher
reading its own hidden states through the same head, as with LoRA; ``ce``: ``alpha=0``, no teacher), one
forward + backward of :func:`speechllm.losses.lm_loss` on fixed (positions, hidden) hidden states and a
(vocab, hidden) LM head, once per mode: ``naive`` (``chunk_size=0``: all logits at once), ``chunked`` at each
``--chunk``, and on CUDA ``liger`` (Liger-Kernel's fused kernels; its JSD at the first ``--chunk``).

What is counted: everything the loss allocates above what is held before it starts. Held before (not
counted): the student's and teacher's hidden states, the targets, the head's weight and its gradient buffer
(allocated up front, as after an optimizer's first step, so backward adds into it in place). Counted: the
logits and log-probabilities, what autograd saves, the backward's gradient temporaries and the hidden
states' new gradient; with a ``trainable`` head also the (vocab, hidden) weight gradients autograd computes
before adding them to the buffer (with chunks: each chunk's, and their running sum: about 2 x vocab x hidden).
A ``frozen`` head (a frozen LLM, with or without LoRA) has none, so its ratio is that of the logits alone.

Each measurement is a fresh subprocess: on CPU its peak resident memory (``ru_maxrss``, Linux, reset through
``/proc/self/clear_refs`` just before the loss) above the resident memory at that moment; on CUDA
``torch.cuda.max_memory_allocated`` above ``memory_allocated`` at that moment. Prints a table with the ratio
to naive and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

LOSSES = {"distill": 1.0, "ce": 0.0}  # loss name -> alpha
HEADS = ("trainable", "frozen")  # full fine-tuning trains the LM head; a frozen LLM (with or without LoRA) does not


def _reset_peak_rss_kib() -> int:
    """Resets the process's peak RSS to its current RSS where Linux allows it; returns the new peak (KiB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: the baseline is then the peak so far (allocation included)
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _PeakMemory:
    """Peak bytes allocated inside the ``with`` block above what was held when it began (CUDA or CPU RSS)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> _PeakMemory:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._baseline = torch.cuda.memory_allocated()
        else:
            self._baseline = _reset_peak_rss_kib() * 1024
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._baseline
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._baseline


def measure(spec: dict) -> dict:
    """One forward + backward of ``lm_loss`` in this process -> the loss's peak MiB above baseline, seconds."""
    import torch

    from speechllm.losses import lm_loss

    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    n, d, vocab, alpha = spec["positions"], spec["hidden"], spec["vocab"], LOSSES[spec["loss"]]
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(d, vocab, bias=False).to(device=device, dtype=dtype)
    if spec["head"] == "trainable":
        head.weight.grad = torch.zeros_like(head.weight)
    else:
        head.weight.requires_grad_(False)
    student = torch.randn(n, d, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(n, d, generator=generator).to(device=device, dtype=dtype) if alpha > 0 else None
    targets = torch.randint(vocab, (n,), generator=generator).to(device)
    kwargs = dict(alpha=alpha, chunk_size=spec["chunk"], kernel=spec["kernel"])

    def loss_step(student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor) -> float:
        out = lm_loss(student, head, targets, teacher_hidden=teacher, **kwargs)
        out["loss"].backward()
        return out["loss"].item()

    # Warm-up on 8 fresh rows: thread pools, kernels (and Liger's compilation) stay out of the measurement.
    loss_step(student[:8].detach().clone().requires_grad_(True), None if teacher is None else teacher[:8], targets[:8])
    row = {k: spec[k] for k in ("vocab", "loss", "head", "mode", "chunk", "kernel", "positions", "hidden", "dtype",
                                "device")}
    start = time.perf_counter()
    try:
        with _PeakMemory(device) as peak:
            value = loss_step(student, teacher, targets)
    except (MemoryError, RuntimeError) as err:  # torch's CPU allocator raises RuntimeError when it cannot
        return {**row, "error": "out of memory" if _is_out_of_memory(err) else f"{type(err).__name__}: {err}"}
    seconds = time.perf_counter() - start
    return {**row, "peak_mib": peak.peak_bytes / 2**20, "seconds": seconds, "value": value}


def _is_out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate" in text


def _measure_in_subprocess(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "stages.bench_memory", "--worker", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode == -9:  # SIGKILL: the kernel's OOM killer
        return {**spec, "error": "out of memory (killed)"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {**spec, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _modes(chunks: list[int], cuda: bool) -> list[tuple[str, int, str]]:
    """(mode, chunk_size, kernel): naive first (the ratios' denominator), then chunked per size, then liger."""
    modes = [("naive", 0, "torch"), *((f"chunked {c}", c, "torch") for c in chunks)]
    return modes + [("liger", chunks[0], "liger")] if cuda else modes


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's peak as a share of the naive peak of its vocabulary, loss and head."""
    naive = {(r["vocab"], r["loss"], r["head"]): r.get("peak_mib") for r in rows if r["mode"] == "naive"}
    for r in rows:
        base = naive.get((r["vocab"], r["loss"], r["head"]))
        if "peak_mib" in r and base:
            r["ratio_to_naive"] = r["peak_mib"] / base
    return rows


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'vocab':>8} {'loss':<8} {'head':<10} {'mode':<14} {'peak MiB of the loss':>21} {'/ naive':>8} "
          f"{'seconds':>8}")
    for r in rows:
        head = f"{r['vocab']:>8} {r['loss']:<8} {r['head']:<10} {r['mode']:<14}"
        if "error" in r:
            print(f"{head} {r['error']:>21}")
        else:
            ratio = f"{100 * r['ratio_to_naive']:.0f} %" if "ratio_to_naive" in r else "-"
            print(f"{head} {r['peak_mib']:>21.0f} {ratio:>8} {r['seconds']:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.bench_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936], help="vocabulary sizes")
    parser.add_argument("--positions", type=int, default=2048, help="text positions the loss runs on")
    parser.add_argument("--hidden", type=int, default=1536, help="LLM hidden size (Qwen2.5-1.5B: 1536)")
    parser.add_argument("--chunk", type=int, nargs="+", default=[256, 1024],
                        help="lm_loss chunk sizes of the chunked modes (model.loss_chunk_size: 256 by default)")
    parser.add_argument("--loss", choices=LOSSES, nargs="+", default=list(LOSSES), help="losses to measure")
    parser.add_argument("--head", choices=HEADS, nargs="+", default=list(HEADS), help="LM heads to measure")
    parser.add_argument("--device", default="auto", help="auto (cuda where available), cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) or a torch dtype")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each measurement")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/distill_memory.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one measurement's spec (JSON); its row on stdout
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    if min(args.chunk) <= 0:
        parser.error(f"--chunk sizes must be > 0, got {args.chunk}")

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = ("bfloat16" if device == "cuda" else "float32") if args.dtype == "auto" else args.dtype
    settings = {"positions": args.positions, "hidden": args.hidden, "device": device, "dtype": dtype,
                "threads": args.threads}
    rows = []
    for vocab in args.vocab:
        for loss, head in itertools.product(args.loss, args.head):
            for mode, chunk, kernel in _modes(args.chunk, device == "cuda"):
                print(f"[bench_memory] vocab {vocab}, {loss}, {head} head, {mode} ...", flush=True)
                rows.append(_measure_in_subprocess({**settings, "vocab": vocab, "loss": loss, "head": head,
                                                    "mode": mode, "chunk": chunk, "kernel": kernel}))
    _print_table(_with_ratios(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {**settings, "chunks": args.chunk}, "rows": rows}, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
