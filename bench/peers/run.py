"""Run one trainer job through launch.py under the tool's python, niced, one thread; read its stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from peers import install, tools

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).with_name("launch.py")


def tool_python(tool: str, home: Path) -> str:
    return sys.executable if tool == "ours" else str(install.install(home, tool))


def run_job(job: tools.Job, home: Path, timeout_s: float = 1800) -> dict:
    """Train; returns the stats (steps, CPU seconds of the steps and of the process, wall, RSS)."""
    job.out.mkdir(parents=True, exist_ok=True)
    stats_path = job.out / "stats.json"
    if stats_path.exists() and json.loads(stats_path.read_text()).get("rc") == 0:
        return summarize(json.loads(stats_path.read_text()))
    args = tools.COMMANDS[job.tool](job)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(ROOT) if job.tool == "ours" else ""
    cmd = ["nice", "-n", "5", tool_python(job.tool, home), str(LAUNCH), job.tool, str(stats_path), "--", *args]
    (job.out / "cmd.txt").write_text(" ".join(cmd) + "\n")
    t0 = time.perf_counter()
    with open(job.out / "log.txt", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=job.out, timeout=timeout_s).returncode
    if rc != 0 or not stats_path.exists():
        tail = (job.out / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"{job.tool}/{job.setting} failed (rc {rc}); log {job.out}/log.txt:\n{tail}")
    stats = json.loads(stats_path.read_text())
    stats.update(rc=0, wall_s=time.perf_counter() - t0)
    stats_path.write_text(json.dumps(stats))
    return summarize(stats)


def summarize(stats: dict) -> dict:
    """Training CPU seconds = CPU between the first and last optimizer step, scaled by n/(n-1)
    (the first step's own time is not bracketed), so startup and export are not counted."""
    steps = stats["steps"]
    n = len(steps)
    train_cpu = (steps[-1]["cpu"] - steps[0]["cpu"]) * n / (n - 1) if n > 1 else float("nan")
    train_wall = (steps[-1]["wall"] - steps[0]["wall"]) * n / (n - 1) if n > 1 else float("nan")
    return {"steps": n, "train_cpu_s": train_cpu, "cpu_s_per_step": train_cpu / n if n else float("nan"),
            "train_wall_s": train_wall, "cpu_s_total": stats["cpu_s_total"], "wall_s": stats.get("wall_s"),
            "peak_rss_mb": stats["peak_rss_mb"]}
