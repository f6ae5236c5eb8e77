"""Where the real-engine tests find vLLM's CPU build, and what they do without it.

The same engine python `baldeagle serve-bench` uses (baldeagle.serve.engine_python): the
BALDEAGLE_VLLM_PYTHON variable, else `.venv-vllm` made by benchmarks/setup_vllm_venv.sh.
"""

import os
from pathlib import Path

import pytest

from baldeagle.serve import REPO_ROOT

VLLM_PYTHON = Path(os.environ.get("BALDEAGLE_VLLM_PYTHON") or REPO_ROOT / ".venv-vllm" / "bin" / "python")


def require_vllm() -> None:
    """Skip the calling module without vLLM's CPU build, or fail when BALDEAGLE_REQUIRE_VLLM=1 (set
    by .ci/run, which installs the engine first) says it must be there, so CI cannot pass by skipping."""
    if VLLM_PYTHON.is_file():
        return
    why = f"vLLM's CPU build is not installed ({VLLM_PYTHON} missing): run bash benchmarks/setup_vllm_venv.sh"
    if os.environ.get("BALDEAGLE_REQUIRE_VLLM") == "1":
        pytest.fail(f"{why} (BALDEAGLE_REQUIRE_VLLM=1: the real-engine tests must run)", pytrace=False)
    pytest.skip(why)
