import os
from pathlib import Path

import pytest
import torch

# Two cores: keep intra-op threads bounded so parallel test processes do not oversubscribe.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO.parent / "shared" / "data" / "benchmarks"


@pytest.fixture
def bench_dir():
    if not BENCH_DIR.is_dir():
        pytest.skip(f"benchmark files not found at {BENCH_DIR}")
    return BENCH_DIR
