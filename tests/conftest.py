import os
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads
# that spin-wait for each other made the decoding tests 10x slower. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO.parent / "shared" / "data" / "benchmarks"


@pytest.fixture
def bench_dir():
    if not BENCH_DIR.is_dir():
        pytest.skip(f"benchmark files not found at {BENCH_DIR}")
    return BENCH_DIR
