"""Target loading: straight to the device in the asked dtype, and hub ids fingerprinted by revision."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from dflash_lab.models import target as T
from dflash_lab.testing import tiny_target_dir

REPO = Path(__file__).resolve().parents[2]


def test_loads_in_the_asked_dtype_without_a_cpu_copy(tmp_path, monkeypatch):
    path = tiny_target_dir(tmp_path / "t")
    moved = []
    real_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append((a, k)) or real_to(self, *a, **k))
    target = T.load_target(path, dtype="bfloat16", device="cpu")
    assert target.dtype == torch.bfloat16 and target.device.type == "cpu"
    assert moved == []  # loaded where it lives: no .to(device) copy after loading
    assert T._device_kwargs("cpu") == {}
    assert T._device_kwargs("cuda:1") == {"device_map": {"": "cuda:1"}}


_HUB_SCRIPT = """
import json, sys
from dflash_lab.models.target import load_target
print(json.dumps(load_target(sys.argv[1]).fingerprint))
"""


def _fake_hub_cache(cache: Path, repo: str, commit: str, source: Path) -> None:
    """The layout huggingface_hub keeps on disk: models--org--name/{refs/main, snapshots/<commit>/}."""
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)


def test_hub_target_fingerprint_follows_the_resolved_revision(tmp_path):
    src = tiny_target_dir(tmp_path / "src")
    prints = []
    for i, commit in enumerate(["a" * 40, "b" * 40]):
        _fake_hub_cache(tmp_path / f"hub{i}", "test-org/tiny", commit, src)
        prints.append(T.hub_fingerprint("test-org/tiny", cache_dir=tmp_path / f"hub{i}"))
    assert prints[0] != prints[1]  # the same files under another revision: another target
    assert T.hub_fingerprint("test-org/other", cache_dir=tmp_path / "hub0") != prints[0]
    # the real loader on a hub id (offline, from the cache) records that fingerprint
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub1"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, "test-org/tiny"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == prints[1]
