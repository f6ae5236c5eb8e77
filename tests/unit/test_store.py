"""The offline feature store: plan, atomic resumable writes, checked reads, and parity with online."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from tiny_targets import tiny_target

from baldeagle import cli
from baldeagle.config import FeaturesConfig
from baldeagle.data import store
from baldeagle.data.features import OnlineFeatures
from baldeagle.data.store import DiskSpaceError, run_features
from baldeagle.data.store_layout import ShardPlan, plan_shards
from baldeagle.data.store_reader import (
    FeatureStore, OfflineFeatures, StoreError, load_lm_head, shard_name, store_size,
)
from baldeagle.conventions import default_aux_layers
from baldeagle.train.collate import PadCollator


def make_prepared(folder: Path, rows: list[list[int]]) -> Path:
    datasets.Dataset.from_dict({"input_ids": rows, "loss_mask": [[1] * len(r) for r in rows]}).save_to_disk(folder)
    (folder / "stats.json").write_text(json.dumps({"rows_kept": len(rows)}))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    model = tiny_target("llama")
    model.save_pretrained(root / "model")
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 48, (24,), generator=generator).tolist()
    rows = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in lengths]
    make_prepared(root / "prepared", rows)
    return {"root": root, "model": model, "rows": rows}


def config(setup, out, **overrides) -> FeaturesConfig:
    values = dict(model=str(setup["root"] / "model"), data=str(setup["root"] / "prepared"), out=str(out),
                  draft_type="eagle3", batch_tokens=96, shard_tokens=160)
    return FeaturesConfig(**{**values, **overrides})


def manifest_without_provenance(path: Path) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("provenance")
    return manifest


def assert_same_store(a: Path, b: Path) -> None:
    shards = sorted(p.name for p in a.glob("shard-*.safetensors"))
    assert shards == sorted(p.name for p in b.glob("shard-*.safetensors")) and shards
    for name in shards:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert manifest_without_provenance(a) == manifest_without_provenance(b)
    assert not [p for p in b.iterdir() if p.name.startswith(".")]  # no temporary file left behind


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted eagle3 run, the store the resumed runs must reproduce."""
    out = setup["root"] / "reference"
    summary = run_features(config(setup, out))
    return out, summary


def batch_of(rows, indices, max_length=2048):
    collate = PadCollator(pad_token_id=0, max_length=max_length)
    batch = collate([{"input_ids": rows[i], "loss_mask": rows[i]} for i in indices])
    batch["row_index"] = torch.tensor(indices)
    return batch


def test_plan_sorts_batches_and_shards():
    lengths = [5, 40, 12, 12, 3, 100, 7, 40]
    plans = plan_shards(list(range(8)), lengths, batch_tokens=64, shard_tokens=60)
    assert sorted(r for p in plans for r in p.rows) == list(range(8))
    order = [r for p in plans for r in p.rows]
    assert order == [5, 1, 7, 2, 3, 6, 0, 4]  # longest first, ties by row id
    for plan in plans:
        assert plan.offsets()[-1] == plan.tokens
        for start, end in plan.batches:
            width = plan.lengths[start]
            assert width == max(plan.lengths[start:end])
            assert (end - start) * width <= 64 or end - start == 1  # a row longer than a batch goes alone
    assert plans[0].rows == [5]  # 100 tokens: a shard of its own
    assert plan_shards(list(range(8)), lengths, 64, 60)[1].rows == plans[1].rows  # deterministic


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
def test_reader_matches_online_features(setup, reference, tmp_path, draft_type):
    if draft_type == "eagle3":
        out, summary = reference
    else:
        out = tmp_path / "eagle1"
        summary = run_features(config(setup, out, draft_type="eagle1"))
    hidden, aux = 64, default_aux_layers(6)
    per_token = (4 * hidden if draft_type == "eagle3" else hidden) * 2 + 4  # bf16 features + int32 ids
    assert summary["bytes_per_token"] == per_token
    assert summary["tokens"] == sum(len(r) for r in setup["rows"])
    fs = FeatureStore(out)
    assert fs.draft_type == draft_type and len(fs) == len(setup["rows"]) and fs.row_indices == list(range(24))
    assert fs.aux_layer_ids == (aux if draft_type == "eagle3" else [])
    headers = sum(e["bytes"] - e["tokens"] * per_token for e in fs.manifest["shards"])
    assert 0 < headers < 0.5 * summary["bytes"]
    assert json.loads((out / "manifest.json").read_text())["target"]["vocab_size"] == 256

    offline = OfflineFeatures(fs, load_lm_head(str(setup["root"] / "model")), draft_type)
    online = OnlineFeatures(setup["model"], draft_type, aux)
    for indices, max_length in (([3, 10, 17, 0], 2048), ([5, 6], 16)):  # 16: rows cut by the trainer
        batch = batch_of(setup["rows"], indices, max_length)
        got, want = offline(batch), online(batch)
        mask = batch["attention_mask"].bool()
        for name in ("features", "last_hidden", "logits"):
            g, w = getattr(got, name), getattr(want, name)
            if name != "logits":  # logits are lazy (TargetLogits): compared where indexed
                assert g.shape == w.shape and g.dtype == torch.float32
                assert torch.all(g[~mask] == 0)  # zero-padded
            assert g[mask].shape == w[mask].shape and g[mask].dtype == torch.float32
            scale = w[mask].abs().max()
            torch.testing.assert_close(g[mask], w[mask], atol=1e-2 * scale, rtol=1e-2)
    row = fs.row(7)
    assert row["input_ids"].tolist() == setup["rows"][7]
    assert row["features"].dtype == torch.bfloat16


# The child: `baldeagle features` with a slow target (each batch sleeps), so that the parent can
# SIGKILL it while it is writing a shard, after the first shard is published.
WRITER = """
import json, sys, time
from baldeagle.config import FeaturesConfig
from baldeagle.data import store
real_extract = store.extract
def slow_extract(*args, **kwargs):
    time.sleep(0.2)
    return real_extract(*args, **kwargs)
store.extract = slow_extract
store.run_features(FeaturesConfig(**json.loads(sys.argv[1])))
"""


def start_writer(cfg: FeaturesConfig) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(dataclasses.asdict(cfg))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def sigkill_while_writing(process: subprocess.Popen, out: Path, timeout: float = 300) -> None:
    """Wait until a shard is published and the next one is half written (its temp file exists), then SIGKILL."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the writer exited ({process.returncode}) before it could be killed: "
                                 f"{process.stderr.read().decode()[-2000:]}")
        if list(out.glob("shard-*.safetensors")) and list(out.glob(".shard-*.tmp")):
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL
            return
        time.sleep(0.01)
    process.kill()
    raise AssertionError("the writer published no shard in time")


def test_sigkill_while_writing_then_resume_is_identical(setup, reference, tmp_path):
    """A real `features` process killed with SIGKILL in the middle of a shard leaves only whole
    shards (and a temporary file); the same command then resumes and ends with the bytes and rows
    of an uninterrupted run."""
    ref, summary = reference
    assert summary["shards"] >= 4
    out = tmp_path / "killed"
    sigkill_while_writing(start_writer(config(setup, out)), out)
    published = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert 1 <= len(published) < summary["shards"] and not (out / "manifest.json").exists()
    assert list(out.glob(".shard-*.tmp"))  # the half shard is a temporary file, never a shard
    for name in published:  # no half shard: every published shard is the uninterrupted run's
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    with pytest.raises(FileNotFoundError, match="did not finish"):
        FeatureStore(out)

    resumed = run_features(config(setup, out))
    assert resumed["shards_skipped"] == len(published)
    assert resumed["shards_written"] == summary["shards"] - len(published)
    assert_same_store(ref, out)
    ours, theirs = FeatureStore(out), FeatureStore(ref)
    assert ours.row_indices == theirs.row_indices == list(range(len(setup["rows"])))
    for row in ours.row_indices:
        for name, value in theirs.row(row).items():
            assert torch.equal(ours.row(row)[name], value), (row, name)
    (out / "manifest.json").unlink()  # the manifest is rebuilt from the shards' own metadata
    again = run_features(config(setup, out))
    assert again["shards_written"] == 0
    assert_same_store(ref, out)


def test_damaged_stores_are_errors_naming_the_file(reference, tmp_path):
    ref, _ = reference
    cases = {}
    for case in ("truncated", "header", "missing", "manifest"):
        cases[case] = tmp_path / case
        shutil.copytree(ref, cases[case])
    shard = cases["truncated"] / shard_name(1)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreError, match=f"{shard}.*truncated"):
        FeatureStore(cases["truncated"])
    shard = cases["header"] / shard_name(2)
    data = bytearray(shard.read_bytes())
    data[8:40] = b"x" * 32  # same size, garbage header
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{shard}.*corrupted"):
        FeatureStore(cases["header"])
    shard = cases["missing"] / shard_name(0)
    shard.unlink()
    with pytest.raises(StoreError, match=f"{shard}.*missing"):
        FeatureStore(cases["missing"])
    (cases["manifest"] / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        FeatureStore(cases["manifest"])
    # The writer refuses a damaged shard too instead of trusting it on resume.
    with pytest.raises(StoreError, match=shard_name(1)):
        store._check_existing(cases["truncated"], *_plan_of(FeatureStore(ref)))


def _rewrite_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        change(entry)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_shard_overwritten_in_place_fails_its_checksum(reference, tmp_path):
    ref, _ = reference
    fs = FeatureStore(ref)
    entry = fs.manifest["shards"][1]
    assert entry["sha256"] == hashlib.sha256((ref / entry["file"]).read_bytes()).hexdigest()
    damaged = tmp_path / "damaged"
    shutil.copytree(ref, damaged)
    shard = damaged / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-64:] = b"\xff" * 64  # same size, the header intact: bf16 NaNs where features were
    shard.write_bytes(bytes(data))
    fs = FeatureStore(damaged)  # opens: sizes, header and shapes all look right
    other = fs.manifest["shards"][0]["rows"][0]
    assert torch.equal(fs.read(other, "input_ids"), FeatureStore(ref).read(other, "input_ids"))
    with pytest.raises(StoreError, match=rf"shard {shard} does not match the sha256 in .*manifest\.json"):
        fs.row(entry["rows"][0])
    # A manifest from before checksums (no sha256) is still read, unverified.
    old = tmp_path / "old"
    shutil.copytree(ref, old)
    _rewrite_manifest(old, lambda e: e.pop("sha256"))
    row = entry["rows"][0]
    assert torch.equal(FeatureStore(old).read(row, "last_hidden"), FeatureStore(ref).read(row, "last_hidden"))


@pytest.mark.parametrize("name", ["/etc/passwd", "../reference/shard-00000.safetensors", "..", "sub/shard.safetensors"])
def test_manifest_shard_names_must_stay_inside_the_store(reference, tmp_path, name):
    ref, _ = reference
    folder = tmp_path / "store"
    shutil.copytree(ref, folder)
    _rewrite_manifest(folder, lambda e: e.update(file=name) if e["index"] == 0 else None)
    with pytest.raises(StoreError, match=rf"{folder / 'manifest.json'}: shard file name '{re.escape(name)}' "
                                         "is not a plain file name"):
        FeatureStore(folder)


def _plan_of(fs):
    plans = [ShardPlan(e["index"], e["rows"], [b - a for a, b in zip(e["offsets"], e["offsets"][1:])], [])
             for e in fs.manifest["shards"]]
    return plans, fs.fields, fs.manifest["store_key"]


def test_lm_head_is_read_alone_from_the_checkpoint(tmp_path):
    for name in ("llama", "qwen2"):  # qwen2: tied embeddings, stored as model.embed_tokens.weight
        model = tiny_target(name)
        model.save_pretrained(tmp_path / name)
        assert torch.equal(load_lm_head(str(tmp_path / name)), model.lm_head.weight)


def test_store_for_another_draft_type_or_target_is_refused(setup, reference, tmp_path):
    ref, _ = reference
    fs = FeatureStore(ref)
    head = load_lm_head(str(setup["root"] / "model"))
    with pytest.raises(StoreError, match="eagle3, not eagle1"):
        OfflineFeatures(fs, head, "eagle1")
    other = tiny_target("llama", seed=1)
    with pytest.raises(StoreError, match="differs"):
        OfflineFeatures(fs, other.lm_head, "eagle3")
    OfflineFeatures(fs, setup["model"].lm_head.weight.to(torch.bfloat16), "eagle3")  # bf16 target, same head
    with pytest.raises(StoreError, match="vocab 256"):
        OfflineFeatures(fs, tiny_target("llama", vocab_size=300).lm_head, "eagle3")
    with pytest.raises(StoreError, match="written for target"):
        fs.validate_for("eagle3", tiny_target("llama", num_hidden_layers=4).config)
    fs.validate_for("eagle3", setup["model"].config, default_aux_layers(6))
    with pytest.raises(StoreError, match="aux layers"):
        fs.validate_for("eagle3", aux_layer_ids=[1, 2, 3])
    # Prepared data from another tokenizer/prep run: the token ids differ.
    offline = OfflineFeatures(fs, setup["model"].lm_head, "eagle3")
    batch = batch_of(setup["rows"], [4, 8])
    batch["input_ids"][1, 0] = (batch["input_ids"][1, 0] + 1) % 256
    with pytest.raises(StoreError, match="prepared row 8 differ"):
        offline(batch)
    with pytest.raises(KeyError, match="row 99"):
        offline(batch_of(setup["rows"] + [[5, 6]] * 80, [99]))
    # The writer will not mix another run's shards into a store.
    out = tmp_path / "mixed"
    shutil.copytree(ref, out)
    with pytest.raises(StoreError, match="other settings"):
        run_features(config(setup, out, draft_type="eagle1"))


def test_limit_max_bytes_and_disk_check(setup, tmp_path, monkeypatch):
    summary = run_features(config(setup, tmp_path / "limit", limit=5, draft_type="eagle1"))
    assert FeatureStore(tmp_path / "limit").row_indices == [0, 1, 2, 3, 4]
    assert summary["tokens"] == sum(len(r) for r in setup["rows"][:5])
    budget = 40_000
    run_features(config(setup, tmp_path / "bytes", max_bytes=budget))
    fs = FeatureStore(tmp_path / "bytes")
    assert store_size(tmp_path / "bytes") <= budget
    assert 0 < len(fs) < 24 and fs.row_indices == list(range(len(fs)))  # the longest prefix that fits
    with pytest.raises(ValueError, match="too small"):
        run_features(config(setup, tmp_path / "tiny", max_bytes=100))

    class Usage:
        free = 1000

    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(DiskSpaceError, match="--force"):
        run_features(config(setup, tmp_path / "full", limit=3))
    assert not list((tmp_path / "full").glob("shard-*"))
    run_features(config(setup, tmp_path / "full", limit=3, force=True))
    assert len(FeatureStore(tmp_path / "full")) == 3


def test_cli_features_stage(setup, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["features", "--model", str(setup["root"] / "model"), "--data", str(setup["root"] / "prepared"),
            "--out", str(out), "--draft-type", "eagle1", "--limit", "6", "batch_tokens=64"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().err  # progress messages: logging, on stderr
    assert "baldeagle: features: will write" in printed and "free disk" in printed
    assert len(FeatureStore(out)) == 6 and (out / "config.yaml").is_file()
    assert cli.main(argv[:-3] + ["--draft-type", "eagle5"]) == 2
