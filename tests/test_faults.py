"""`python -m stages faults` (`make faults`): every injected fault is handled, nothing is lost."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"missing audio", "unreadable audio", "wrong sample rate", "audio too long", "empty transcript",
            "non-text transcript", "NaN/inf loss", "unknown config key", "missing model path",
            "disk full while saving", "SIGKILL during training", "SIGKILL while writing a checkpoint",
            "one rank of two dies", "sequence longer than the LLM context"}


def test_fault_table_covers_every_fault_and_loses_nothing(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, "-m", "stages", "faults", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    rows = json.loads(out.read_text())
    failed = [(r["fault"], r["happened"]) for r in rows if not r["ok"]]
    assert proc.returncode == 0 and not failed, failed or proc.stderr[-2000:]
    assert REQUIRED <= {r["fault"].split(" (")[0] for r in rows}
    assert all(r["lost"].startswith("none") for r in rows)
    assert "| fault | what happened | data lost |" in proc.stdout
