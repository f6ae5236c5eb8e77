"""Atomic outputs and target resolution."""

import os
from pathlib import Path

import pytest

from baldeagle import cli
from baldeagle.config import FeaturesConfig, PrepareConfig, RegenerateConfig
from baldeagle.data import prepare, regenerate, store
from baldeagle.io import OutputError, atomic_dir, atomic_write_json, ensure_writable, read_json
from baldeagle.conventions import default_aux_layers
from baldeagle.targets import resolve_model


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
    assert default_aux_layers(7) == [2, 3, 4]
    # shallow targets: three distinct inner layers, in order (the deep rule would repeat one)
    assert [default_aux_layers(n) for n in (4, 5, 6)] == [[1, 2, 3], [1, 2, 4], [1, 3, 5]]
    with pytest.raises(ValueError, match="3 layers has too few"):
        default_aux_layers(3)


def test_ensure_writable_names_the_path_and_why(tmp_path):
    ensure_writable(tmp_path / "new" / "deeper" / "out")  # missing folders are fine: they get created
    (tmp_path / "kept").write_text("old")
    ensure_writable(tmp_path / "kept")  # an existing file that opens for appending
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=rf"cannot write out {blocker}/sub/out: {blocker} is not a folder"):
        ensure_writable(blocker / "sub" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "kept"]  # no probe file left, nothing created


def test_ensure_writable_refuses_a_read_only_folder(tmp_path):
    """The check creates a real file, so it is honest under root too (which ignores mode bits):
    a chmod-ed folder is refused for other users, /proc (read-only even for root) for everyone."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        if os.geteuid() != 0:
            with pytest.raises(OutputError, match=r"readonly/out: .*readonly is not writable"):
                ensure_writable(readonly / "out")
    finally:
        readonly.chmod(0o755)
    if Path("/proc/self").is_dir():
        with pytest.raises(OutputError, match=r"cannot write out /proc/baldeagle-out: /proc is not writable"):
            ensure_writable("/proc/baldeagle-out")


def _never(*args, **kwargs):
    raise AssertionError("the stage started its work before checking its output")


@pytest.mark.parametrize("stage, make, patch", [
    ("prepare", lambda out: PrepareConfig(dataset="x.jsonl", out=out), (prepare, "load_tokenizer")),
    ("regenerate", lambda out: RegenerateConfig(dataset="x.jsonl", out=out), (regenerate, "conversations_from")),
    ("features", lambda out: FeaturesConfig(data="prepared", out=out), (store, "load_prepared")),
])
def test_stages_check_their_output_before_the_work(stage, make, patch, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(*patch, _never)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = str(blocker / "out")
    with pytest.raises(OutputError, match=rf"cannot write out {out}: {blocker} is not a folder"):
        cli.run_stage(stage, make(out))
    assert cli.main([stage, "--out", out]) == 2
    assert f"cannot write out {out}" in capsys.readouterr().err
