"""The short soak: scripts/soak.py with 16 readers for a short while, in the suite.

The script itself judges the run (every byte compared, errors, hangs, the daemon log, `regfs cache
verify`); this test checks its verdict and that the load it promises really ran: reads whole and
ranged, ref moves, prefetches and gc passes, and evictions under the mount's cap.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.mounting import PROJECT_ROOT


def test_short_soak_serves_no_wrong_byte(tools, tmp_path):
    figures_file = tmp_path / "soak.json"
    completed = subprocess.run(
        [sys.executable, PROJECT_ROOT / "scripts" / "soak.py", "--duration", "20", "--files", "600",
         "--big", "2", "--readers", "16", "--workdir", tmp_path / "soak", "--dvc", tools.dvc3,
         "--json", figures_file],
        cwd=PROJECT_ROOT, env=tools.env, capture_output=True, text=True, timeout=600, check=False)
    report = f"{completed.stdout}\n{completed.stderr}"
    assert completed.returncode == 0, report
    figures = json.loads(figures_file.read_text())
    assert figures["wrong"] == 0 and figures["errors"] == 0 and figures["hangs"] == 0, report
    assert figures["readers_reported"] == 16, report
    assert figures["ops"] > 0 and figures["ranged_ops"] > 0, report
    for activity in ("ref_moves", "prefetch_runs", "gc_runs"):
        assert figures[activity] >= 1, f"no {activity} during the soak\n{report}"
    assert figures["cache_verify_exit"] == 0 and figures["daemon_log_errors"] == 0, report
    log = (tmp_path / "soak" / "regfs.log").read_text()
    assert "evicted " in log, "the mount's cap never made it evict"
