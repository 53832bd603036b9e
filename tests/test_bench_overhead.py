"""``bench overhead``: a one-block run has every loop's wall and CPU seconds per step and its ratio to the bare loop."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages import bench_overhead

REPO = Path(__file__).resolve().parents[1]


def test_one_block_reports_every_loop(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, "-m", "stages.bench_overhead", "--blocks", "1", "--warmup", "1", "--steps", "2",
                           "--batch-size", "2", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    loops = list(bench_overhead.LOOPS)
    assert result["settings"]["steps"] == 2 and result["precision"] in ("bf16-mixed", "32-true")
    for kind in ("wall", "cpu"):
        seconds = result[kind]["s_per_step"]
        assert list(seconds) == loops and all(s > 0 for s in seconds.values())
        for name in loops[1:]:
            assert result[kind]["ratio_to_bare"][name] == pytest.approx(seconds[name] / seconds[bench_overhead.BARE])
    assert all(name in proc.stdout for name in loops) and "target: Lightning <= 1.05 x bare" in proc.stdout
