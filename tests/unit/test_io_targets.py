"""Atomic outputs and target resolution."""

import pytest

from baldeagle.io import atomic_dir, atomic_write_json, read_json
from baldeagle.targets import default_aux_layers, resolve_model


def test_atomic_dir_publishes_only_complete_folders(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("killed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (final / "done.txt").read_text() == "ok"
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_dir(final):
            pass
    # A failed overwrite keeps the old result.
    with pytest.raises(RuntimeError):
        with atomic_dir(final, overwrite=True) as tmp:
            raise RuntimeError("killed")
    assert (final / "done.txt").read_text() == "ok"
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_json_round_trip(tmp_path):
    path = atomic_write_json(tmp_path / "a" / "b.json", {"x": [1, 2]})
    assert read_json(path) == {"x": [1, 2]}
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json(tmp_path / "missing.json")


def test_resolve_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"


def test_default_aux_layers():
    assert default_aux_layers(30) == [2, 15, 27]
    assert default_aux_layers(32) == [2, 16, 29]
