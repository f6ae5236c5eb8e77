"""Reading the offline feature store (`baldeagle features`): memory-mapped rows, checked at open.

A store folder holds `manifest.json` and shards `shard-00000.safetensors`, ... Each shard keeps,
per field, one tensor concatenated over its rows (token-major), so a row is a slice
`[offsets[k], offsets[k+1])` read lazily through `safe_open(...).get_slice`:

    features     bf16 [N, 3H]  EAGLE-3 only: hidden_states[i] for the aux ids, concatenated
    last_hidden  bf16 [N, H]   hidden_states[-1], after the final norm (the LM head's input)
    input_ids    int32 [N]     the token ids, to catch a store read with other prepared data

The manifest lists each shard's file name (a plain name inside the store folder: absolute or
`..` names are refused) and its `sha256`, verified the first time a row of that shard is read
(manifests written before checksums existed lack it and stay readable, unverified).

Logits are never stored: `OfflineFeatures` recomputes them as `last_hidden @ lm_head.T`, from the
target's LM head weight (`load_lm_head` reads only that tensor from the target's safetensors).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from baldeagle.conventions import num_layers, text_config
from baldeagle.data.features import TargetFeatures, TargetLogits
from baldeagle.errors import BaldEagleError

FORMAT = "baldeagle-feature-store"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_METADATA_KEY = "baldeagle_shard"
FIELD_DTYPES = {"bfloat16": ("BF16", torch.bfloat16, 2), "int32": ("I32", torch.int32, 4)}


class StoreError(BaldEagleError):
    """A feature store that is incomplete, corrupted, or written for something else."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def store_fields(draft_type: str, hidden_size: int, num_aux: int) -> dict[str, dict]:
    """What a draft type's training needs, per token: field name → dtype and width (0 = scalar)."""
    if draft_type not in ("eagle1", "eagle3"):
        raise StoreError(f"draft_type must be eagle1 or eagle3, got {draft_type!r}")
    fields = {}
    if draft_type == "eagle3":
        fields["features"] = {"dtype": "bfloat16", "width": num_aux * hidden_size}
    fields["last_hidden"] = {"dtype": "bfloat16", "width": hidden_size}
    fields["input_ids"] = {"dtype": "int32", "width": 0}
    return fields


def bytes_per_token(fields: dict[str, dict]) -> int:
    return sum(FIELD_DTYPES[f["dtype"]][2] * max(f["width"], 1) for f in fields.values())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_shard_info(path: Path) -> dict:
    """The shard's own entry (rows, offsets, store key) from its safetensors metadata."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        return json.loads(meta[SHARD_METADATA_KEY])
    except FileNotFoundError:
        raise StoreError(f"feature store shard {path} is missing") from None
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise StoreError(f"feature store shard {path} is corrupted or not a shard ({error})") from None


def target_identity(config) -> dict:
    """What must match between a store and the target that reads it (from a Transformers config)."""
    text = text_config(config)
    return {
        "model_type": text.model_type,
        "vocab_size": int(text.vocab_size),
        "hidden_size": int(text.hidden_size),
        "num_layers": num_layers(config),
    }


def tensor_sha256(weight: torch.Tensor) -> str:
    """Identity of an LM head: its bytes rounded to bf16, so the head of a target loaded in float32
    or bfloat16 from the same checkpoint gives the same hash (float16 may not: double rounding)."""
    data = weight.detach().to("cpu", torch.bfloat16).contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def load_lm_head(model: str, trust_remote_code: bool = False) -> torch.Tensor:
    """The target's LM head weight [V, H], read alone from its safetensors (tied → the embedding)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import cached_file

    from baldeagle.targets import resolve_model

    name = resolve_model(model)
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = skeleton.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise StoreError(f"{model}: an LM head with a bias is not supported; pass the lm_head module instead")
    # Every parameter name sharing the head's weight (a tied head is stored as the embedding).
    keys = [n for n, p in skeleton.named_parameters(remove_duplicate=False) if p is head.weight]
    index = cached_file(name, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = {k: weight_map[k] for k in keys if k in weight_map}
    else:
        files = {k: "model.safetensors" for k in keys}
    for key, file in files.items():
        path = cached_file(name, file, _raise_exceptions_for_missing_entries=False)
        if not path:
            continue
        with safe_open(path, framework="pt") as handle:
            if key in handle.keys():
                return handle.get_tensor(key)
    raise StoreError(f"{model}: no safetensors tensor named {' or '.join(keys)}; pass the lm_head module instead")


class FeatureStore:
    """Random access to a finished store; the manifest and every shard are checked at open.

    `FeatureStore(path).row(i)` → {"input_ids": int32 [n], "last_hidden": bf16 [n, H],
    "features": bf16 [n, F]} for prepared row `i` (for EAGLE-1, features is last_hidden).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = "the features run did not finish; rerun the same command to resume" if any(
                self.path.glob("shard-*.safetensors")) else "run `baldeagle features` first"
            raise FileNotFoundError(f"{manifest_path} not found: {hint}")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise StoreError(f"{manifest_path} is not valid JSON: {error}") from None
        m = self.manifest
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise StoreError(f"{manifest_path} is not a {FORMAT} v{VERSION} manifest")
        self.draft_type: str = m["draft_type"]
        self.hidden_size: int = m["hidden_size"]
        self.aux_layer_ids: list[int] = list(m["aux_layer_ids"])
        self.target: dict = m["target"]
        self.fields: dict[str, dict] = m["fields"]
        expected = store_fields(self.draft_type, self.hidden_size, len(self.aux_layer_ids))
        if self.fields != expected:
            raise StoreError(f"{manifest_path}: fields {self.fields} do not match draft type {self.draft_type}")
        self.feature_size = expected.get("features", expected["last_hidden"])["width"]
        self._handles: dict[int, object] = {}
        self._verified: set[int] = set()  # shards whose sha256 matched the manifest
        self._where: dict[int, tuple[int, int, int]] = {}  # row → (shard, start, length)
        for shard, entry in enumerate(m["shards"]):
            self._check_shard(shard, entry)
            offsets = entry["offsets"]
            for k, row in enumerate(entry["rows"]):
                if row in self._where:
                    raise StoreError(f"{manifest_path}: row {row} is stored twice")
                self._where[row] = (shard, offsets[k], offsets[k + 1] - offsets[k])

    def _shard_file(self, entry: dict) -> Path:
        """The shard's path; its manifest name must be a plain file name inside the store folder."""
        name = entry.get("file")
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise StoreError(f"{self.path / MANIFEST}: shard file name {name!r} is not a plain file name "
                             "in the store folder (absolute and '..' paths are refused)")
        return self.path / name

    def _verify(self, shard: int) -> None:
        """Compare the shard's bytes with the manifest's sha256 (absent in older manifests)."""
        entry = self.manifest["shards"][shard]
        file = self._shard_file(entry)
        if entry.get("sha256") and file_sha256(file) != entry["sha256"]:
            raise StoreError(f"feature store shard {file} does not match the sha256 in {self.path / MANIFEST}: "
                             "corrupted; delete it and rerun `baldeagle features` to rewrite it")
        self._verified.add(shard)

    def _check_shard(self, shard: int, entry: dict) -> None:
        file = self._shard_file(entry)
        if not file.is_file():
            raise StoreError(f"feature store shard {file} is missing (listed in {self.path / MANIFEST})")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise StoreError(
                f"feature store shard {file} has {size} bytes, the manifest says {entry['bytes']}: "
                "truncated or corrupted; delete it and rerun `baldeagle features` to rewrite it"
            )
        tokens = entry["offsets"][-1]
        if len(entry["offsets"]) != len(entry["rows"]) + 1 or tokens != entry["tokens"]:
            raise StoreError(f"{self.path / MANIFEST}: inconsistent offsets for {entry['file']}")
        try:
            handle = safe_open(str(file), framework="pt")
            names = set(handle.keys())
            shapes = {name: handle.get_slice(name).get_shape() for name in names}
            dtypes = {name: handle.get_slice(name).get_dtype() for name in names}
        except Exception as error:
            raise StoreError(f"feature store shard {file} is corrupted ({error})") from None
        for name, spec in self.fields.items():
            want = [tokens, spec["width"]] if spec["width"] else [tokens]
            if name not in names or list(shapes[name]) != want or dtypes[name] != FIELD_DTYPES[spec["dtype"]][0]:
                raise StoreError(
                    f"feature store shard {file} is corrupted: tensor {name} is "
                    f"{dtypes.get(name)} {shapes.get(name)}, expected {FIELD_DTYPES[spec['dtype']][0]} {want}"
                )
        self._handles[shard] = handle

    def __getstate__(self):  # safe_open handles do not pickle; reopen lazily in the new process
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self._shard_file(self.manifest["shards"][shard])), framework="pt")
        return self._handles[shard]

    # ---- rows -----------------------------------------------------------------------------
    @property
    def row_indices(self) -> list[int]:
        """Prepared-row indices held by the store (a --limit / --max-bytes store holds a subset)."""
        return sorted(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, row: int) -> bool:
        return int(row) in self._where

    def length(self, row: int) -> int:
        return self._locate(row)[2]

    def _locate(self, row: int) -> tuple[int, int, int]:
        try:
            return self._where[int(row)]
        except KeyError:
            raise KeyError(
                f"prepared row {int(row)} is not in the feature store {self.path} "
                f"({len(self)} rows; a --limit or --max-bytes store holds a subset)"
            ) from None

    def read(self, row: int, field: str, length: int | None = None) -> torch.Tensor:
        """One field of one row, its first `length` tokens (default: all), as stored."""
        shard, start, n = self._locate(row)
        if shard not in self._verified:
            self._verify(shard)
        if field == "features" and self.draft_type == "eagle1":
            field = "last_hidden"
        if length is not None:
            if length > n:
                raise StoreError(
                    f"row {int(row)} has {n} stored tokens but the batch has {length}: the store was "
                    f"written with max_length {self.manifest['max_length']}; train with a max_length at most that"
                )
            n = length
        return self._handle(shard).get_slice(field)[start : start + n]

    def row(self, row: int, length: int | None = None) -> dict[str, torch.Tensor]:
        return {name: self.read(row, name, length) for name in ("input_ids", "last_hidden", "features")}

    # ---- identity -------------------------------------------------------------------------
    def validate_for(self, draft_type: str | None = None, target_config=None,
                     aux_layer_ids: list[int] | None = None) -> None:
        """Raise a StoreError unless the store fits this draft type, target config and aux ids."""
        where = f"the feature store {self.path}"
        if draft_type is not None and draft_type != self.draft_type:
            raise StoreError(f"{where} was written for {self.draft_type}, not {draft_type}; "
                             f"rerun `baldeagle features --draft-type {draft_type}`")
        if aux_layer_ids and self.draft_type == "eagle3" and list(aux_layer_ids) != self.aux_layer_ids:
            raise StoreError(f"{where} holds aux layers {self.aux_layer_ids}, not {list(aux_layer_ids)}")
        if target_config is not None:
            mine = {k: self.target.get(k) for k in ("model_type", "vocab_size", "hidden_size", "num_layers")}
            theirs = {k: target_identity(target_config)[k] for k in mine}
            if mine != theirs:
                raise StoreError(f"{where} was written for target {self.target.get('name')} {mine}, "
                                 f"not this target {theirs}")


class OfflineFeatures:
    """`TargetFeatures` for a batch, read from a store instead of running the target.

    batch: "row_index" [B] (prepared-row ids), "input_ids" and "attention_mask" [B, T], right
    padded (rows may be cut to the trainer's max_length). Returns float32, zero-padded features
    and last_hidden on the batch's device, and logits = last_hidden @ lm_head.T as a `TargetLogits`
    (computed only at the positions indexed, like the online features').
    """

    def __init__(self, store: FeatureStore | str | Path, lm_head: torch.Tensor | nn.Module, draft_type: str,
                 check_lm_head: bool = True):
        self.store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        self.store.validate_for(draft_type=draft_type)
        self.draft_type = draft_type
        weight = lm_head.weight if isinstance(lm_head, nn.Module) else lm_head
        bias = getattr(lm_head, "bias", None) if isinstance(lm_head, nn.Module) else None
        target = self.store.target
        if tuple(weight.shape) != (target["vocab_size"], self.store.hidden_size):
            raise StoreError(
                f"the LM head is {tuple(weight.shape)} but the feature store {self.store.path} was written for "
                f"target {target.get('name')} with vocab {target['vocab_size']} and hidden {self.store.hidden_size}"
            )
        if check_lm_head and target.get("lm_head_sha256") and tensor_sha256(weight) != target["lm_head_sha256"]:
            raise StoreError(
                f"the LM head differs from the one of target {target.get('name')} that wrote the feature store "
                f"{self.store.path} (another target? a float16 copy?); read it with load_lm_head(model), "
                "or pass check_lm_head=False if it is the same target"
            )
        self.weight = weight.detach().float()
        self.bias = None if bias is None else bias.detach().float()

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> TargetFeatures:
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        device = input_ids.device
        B, T = input_ids.shape
        features = torch.zeros(B, T, self.store.feature_size)  # shape: [B, T, 3H] or [B, T, H]
        last = torch.zeros(B, T, self.store.hidden_size)  # shape: [B, T, H]
        for b, row in enumerate(batch["row_index"].tolist()):
            n = int(mask[b].sum())
            if not bool(mask[b, :n].all()):
                raise StoreError("OfflineFeatures expects right-padded batches (attention_mask 1…1 0…0)")
            ids = self.store.read(row, "input_ids", n)
            if not torch.equal(ids.long(), input_ids[b, :n].long().cpu()):
                raise StoreError(
                    f"the batch's token ids for prepared row {row} differ from those in the feature store "
                    f"{self.store.path}: it was written from other prepared data (another tokenizer or prep run)"
                )
            last[b, :n] = self.store.read(row, "last_hidden", n).float()
            if self.draft_type == "eagle3":
                features[b, :n] = self.store.read(row, "features", n).float()
        last = last.to(device)
        features = last if self.draft_type == "eagle1" else features.to(device)
        if self.weight.device != device:
            self.weight = self.weight.to(device)
            self.bias = None if self.bias is None else self.bias.to(device)
        # Logits = lm_head(last_hidden), computed lazily where the loss indexes them ([B, T, V] never built).
        return TargetFeatures(features=features, last_hidden=last, logits=TargetLogits(last, self.weight, self.bias))


def store_size(path: str | Path) -> int:
    """Bytes of every file in a store folder."""
    return sum(os.path.getsize(p) for p in Path(path).iterdir() if p.is_file())
