"""bench/gpu.py, the GPU acceptance check, kept from rotting: its --dry-run runs every section's
code path on the CPU with tiny models (the numbers mean nothing there)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), FITMAP_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu.py"),
            "--dry-run",
            "--out",
            str(out),
            "--dir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    sections = ("fidelity", "budget", "cpu_tier", "disk_tier", "startup", "hooks", "moe")
    assert all(name in results and "error" not in results[name] for name in sections)
    assert results["cpu_tier"]["same_tokens"] and results["disk_tier"]["same_tokens"] and results["moe"]["same_tokens"]
    assert results["budget"]["cli"]["exit_code"] == 0  # a CPU-only plan: the long prompt fits
    assert "| section | case | measured | verdict |" in proc.stdout
