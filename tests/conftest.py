import sys
from pathlib import Path

import pytest
import torch

# Shared test helpers (tiny in-process targets, tokenizers, prepared data) live in tests/unit.
sys.path.insert(0, str(Path(__file__).parent / "unit"))
sys.path.insert(0, str(Path(__file__).parent / "e2e"))  # vllm_engine: where the real-engine tests find vLLM


@pytest.fixture(scope="module")
def one_thread():
    """One thread for latency-bound decoding: two OpenMP threads crawl when other jobs share the CPU.
    (Unit tests always run on one thread: see tests/unit/conftest.py.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
