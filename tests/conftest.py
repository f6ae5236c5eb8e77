import sys
from pathlib import Path

# Shared test helpers (tiny in-process targets, tokenizers, prepared data) live in tests/unit.
sys.path.insert(0, str(Path(__file__).parent / "unit"))
