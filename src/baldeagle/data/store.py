"""`baldeagle features`: run the target over prepared rows once and store what training needs.

What is stored per token (bf16; see store_reader.py for the layout):
- EAGLE-1: the last hidden state after the final norm (H). Its regression target is the next
  position's last hidden, its CE target lm_head of that: both come from the same tensor.
- EAGLE-3: the aux-layer inputs concatenated (3H) and the last hidden (H), from which the reader
  recomputes the logits with the target's LM head: 4H per token instead of 3H + V.
Plus the int32 token ids (to catch a store read with other prepared data).

The plan and the shard files are store_layout.py's: length-sorted batches grouped into shards,
each a pure function of its rows, streamed to a temporary file and published with os.replace.
So a killed run restarted with the same command skips the shards already published and ends
with the same bytes as an uninterrupted run. Under torchrun / accelerate launch, shard i belongs
to rank i % world; rank 0 writes the manifest last, after a barrier, from the shards' own
metadata (so a lost manifest is rebuilt by rerunning the command).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from baldeagle.config import FeaturesConfig, write_resolved
from baldeagle.data.prepare import load_prepared
from baldeagle.data.store_layout import (
    IOThread, ShardPlan, plan_shards, select_rows, shard_bytes, store_bytes, write_shard,
)
from baldeagle.data.store_reader import (
    FORMAT, MANIFEST, VERSION, StoreError, bytes_per_token, file_sha256, load_lm_head, read_shard_info,
    shard_name, store_fields, target_identity, tensor_sha256,
)
from baldeagle.errors import BaldEagleError
from baldeagle.io import atomic_write_text, ensure_writable, provenance
from baldeagle.conventions import check_full_attention, default_aux_layers, num_layers
from baldeagle.targets import load_target, load_tokenizer, resolve_model

logger = logging.getLogger(__name__)

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DiskSpaceError(BaldEagleError):
    """The store would not fit on the disk (pass --force to write anyway)."""


# --------------------------------------------------------------------------------------------
# Prepared rows and one batch's features
# --------------------------------------------------------------------------------------------


def scan_rows(dataset) -> tuple[np.ndarray, str]:
    """Row lengths and a fingerprint of every token id, read column-wise through Arrow."""
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    lengths = []
    for table in dataset.with_format("arrow").iter(batch_size=4096):
        column = table["input_ids"]
        lens = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
        digest.update(lens.tobytes())
        digest.update(values.tobytes())
        lengths.append(lens)
    return (np.concatenate(lengths) if lengths else np.zeros(0, np.int64)), digest.hexdigest()


def batch_tensors(dataset, rows: list[int], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask [B, T] for prepared rows (cut to max_length)."""
    ids = [list(r)[:max_length] for r in dataset[rows]["input_ids"]]
    width = max(len(r) for r in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for b, r in enumerate(ids):
        input_ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    return input_ids.to(device), mask.to(device)


@torch.no_grad()
def extract(backbone, input_ids, attention_mask, draft_type: str, aux_layer_ids: list[int]) -> dict:
    """One target forward (no LM head) → the stored fields over the real tokens, row after row."""
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states  # L+1 tensors [B, T, H]; [i] is the input of layer i, [-1] after the norm
    keep = attention_mask.bool()
    fields = {"last_hidden": hidden[-1][keep]}  # shape: [tokens, H]
    if draft_type == "eagle3":
        fields["features"] = torch.cat([hidden[i] for i in aux_layer_ids], dim=-1)[keep]  # shape: [tokens, 3H]
    fields = {k: v.to(torch.bfloat16).cpu() for k, v in fields.items()}
    fields["input_ids"] = input_ids[keep].to(torch.int32).cpu()
    return fields


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _processes() -> PartialState:
    """The processes torchrun or `accelerate launch` started (one without a launcher), set up by
    accelerate: gloo on CPUs, NCCL on GPUs. A long store may keep ranks apart for hours."""
    # cpu=True lets accelerate see a multi-process launch without GPUs (it then uses gloo)
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))


def _rank0_decides(value, world: int):
    if world == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**26 else f"{n / 2**20:.2f} MiB"


def _tokenizer_sha256(model: str, trust_remote_code: bool) -> str | None:
    try:
        tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    except Exception:  # a target folder without a tokenizer: the vocab size still identifies it
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_logits(model, lm_head: torch.Tensor, input_ids: torch.Tensor) -> None:
    """The reader's logits are lm_head(last_hidden): refuse targets that scale or cap them."""
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    ours = out.hidden_states[-1].float().cpu() @ lm_head.float().T
    theirs = out.logits.float().cpu()
    if (ours - theirs).abs().max() > 1e-2 * theirs.abs().max().clamp(min=1.0):
        raise StoreError("this target's logits are not lm_head(last hidden state) (scaled or capped?): "
                         "the offline store cannot rebuild them; train with --mode online")


def _check_existing(out: Path, plans: list[ShardPlan], fields: dict, store_key: str) -> list[bool]:
    """Which shards are already published; stale or foreign files are errors naming the file."""
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            old_key = json.loads(manifest.read_text()).get("store_key")
        except json.JSONDecodeError:
            old_key = None
        if old_key != store_key:
            raise StoreError(f"{out} already holds a feature store written with other settings, data or target; "
                             "remove it or choose another --out")
    names = {shard_name(p.index) for p in plans}
    for path in sorted(out.glob("shard-*.safetensors")):
        if path.name not in names:
            raise StoreError(f"{path} is not part of this run's plan (another run's shard?); "
                             "remove it or choose another --out")
    done = []
    for plan in plans:
        path = out / shard_name(plan.index)
        if not path.is_file():
            done.append(False)
            continue
        info = read_shard_info(path)
        if info.get("store_key") != store_key:
            raise StoreError(f"{path} was written by a run with other settings, data or target; "
                             "remove the folder or choose another --out")
        if path.stat().st_size != shard_bytes(plan, fields, store_key):
            raise StoreError(f"{path} has the wrong size (truncated or corrupted); delete it and rerun")
        done.append(True)
    return done


def _write_manifest(out: Path, header: dict, plans: list[ShardPlan]) -> dict:
    """The manifest, rebuilt from each shard file's own metadata, with its size and sha256 (which
    the reader verifies); one line per shard."""
    shards = []
    for plan in plans:
        path = out / shard_name(plan.index)
        info = read_shard_info(path)
        if info.get("store_key") != header["store_key"] or info["rows"] != plan.rows:
            raise StoreError(f"{path} does not belong to this store")
        info.pop("store_key")
        shards.append({**info, "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    head = json.dumps(header, indent=2)[:-2]
    lines = ",\n".join("    " + json.dumps(s, separators=(",", ":")) for s in shards)
    atomic_write_text(out / MANIFEST, f'{head},\n  "shards": [\n{lines}\n  ]\n}}\n')
    return {**header, "shards": shards}


def _check_settings(cfg: FeaturesConfig) -> None:
    if cfg.draft_type not in ("eagle1", "eagle3"):
        raise ValueError(f"draft_type must be eagle1 or eagle3, got {cfg.draft_type!r}")
    if cfg.target_dtype not in DTYPE_NAMES:
        raise ValueError(f"target_dtype must be one of {sorted(DTYPE_NAMES)}, got {cfg.target_dtype!r}")
    for key in ("max_length", "batch_tokens", "shard_tokens"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"{key} must be positive, got {getattr(cfg, key)}")


def _aux_layers(cfg: FeaturesConfig, config) -> list[int]:
    """The hidden_states ids stored as EAGLE-3 features (none for EAGLE-1)."""
    layers = num_layers(config)
    aux = [] if cfg.draft_type == "eagle1" else list(cfg.aux_layer_ids or default_aux_layers(layers))
    if any(not 0 <= i <= layers for i in aux):
        raise ValueError(f"aux_layer_ids {aux} must lie in [0, {layers}] (hidden_states ids)")
    return aux


def _plan(cfg: FeaturesConfig, all_lengths, fields: dict) -> tuple[list[int], int, list[ShardPlan]]:
    """(every row's stored length, how many leading rows are stored, their shards)."""
    lengths = [min(int(n), cfg.max_length) for n in all_lengths]
    if any(n == 0 for n in lengths):
        raise ValueError(f"prepared dataset {cfg.data} has empty rows; prepare drops them")
    count = select_rows(lengths, cfg.limit, cfg.max_bytes, fields, cfg.batch_tokens, cfg.shard_tokens)
    plans = plan_shards(list(range(count)), lengths[:count], cfg.batch_tokens, cfg.shard_tokens)
    if not plans:
        raise ValueError(f"prepared dataset {cfg.data} has no rows")
    return lengths, count, plans


def _store_key(cfg: FeaturesConfig, aux: list[int], fields: dict, target: dict, fingerprint: str, count: int) -> str:
    """What makes two runs write the same bytes; every shard and the manifest carry it."""
    keyed = {"version": VERSION, "draft_type": cfg.draft_type, "aux_layer_ids": aux, "fields": fields,
             "target": {k: v for k, v in target.items() if k not in ("name", "name_or_path")},
             "target_dtype": cfg.target_dtype, "max_length": cfg.max_length, "batch_tokens": cfg.batch_tokens,
             "shard_tokens": cfg.shard_tokens, "data_fingerprint": fingerprint, "rows": count}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def _check_disk(cfg: FeaturesConfig, out: Path, plans, done, fields, store_key, world, rows: str) -> None:
    """Report the plan; refuse (on every rank alike) a store that would not fit, unless --force."""
    total = store_bytes(plans, fields, store_key)
    needed = store_bytes([p for p, d in zip(plans, done) if not d], fields, store_key)
    free = shutil.disk_usage(out).free
    logger.info(f"features: {rows}, {len(plans)} shards ({sum(done)} already done), "
                f"{bytes_per_token(fields)} bytes/token ({cfg.draft_type}, bf16)")
    logger.info(f"features: will write {_gib(needed)} (store {_gib(total)}) to {out}; free disk {_gib(free)}")
    if _rank0_decides(needed > free and not cfg.force, world):
        raise DiskSpaceError(f"the store needs {_gib(needed)} but {out} has {_gib(free)} free; "
                             "use --max-bytes or --limit for a subset, or --force")


def _write_shards(out: Path, mine: list[ShardPlan], fields, store_key, compute, rank) -> float:
    """Write this rank's shards (target compute overlapping file I/O); returns the seconds taken."""
    from tqdm import tqdm

    started = time.perf_counter()
    io = IOThread()
    try:
        with tqdm(total=sum(p.tokens for p in mine), unit="tok", unit_scale=True, desc="features",
                  disable=rank != 0, dynamic_ncols=True) as progress:
            for plan in mine:
                final = out / shard_name(plan.index)
                write_shard(out / f".{final.name}.tmp", final, plan, fields, store_key, compute, progress, io)
            io.wait()
    finally:
        io.close()
    return time.perf_counter() - started


def _target_record(cfg: FeaturesConfig, identity: dict, lm_head: torch.Tensor) -> dict:
    """The target as the manifest names it: what its features depend on, with checksums."""
    return {"name": cfg.model, "name_or_path": resolve_model(cfg.model), **identity,
            "lm_head_sha256": tensor_sha256(lm_head),
            "tokenizer_sha256": _tokenizer_sha256(cfg.model, cfg.trust_remote_code)}


def _publish_manifest(cfg: FeaturesConfig, out: Path, header: dict, plans, rank: int, world: int) -> None:
    """After every rank's shards are published, rank 0 writes the resolved config and the manifest."""
    if world > 1:
        PartialState().wait_for_everyone()
    if rank == 0:
        write_resolved(cfg, out)
        _write_manifest(out, header, plans)
    if world > 1:
        PartialState().wait_for_everyone()


def run_features(cfg: FeaturesConfig) -> dict:
    """`baldeagle features`: the target's features for every prepared row, as a resumable sharded store."""
    _check_settings(cfg)
    ensure_writable(cfg.out)
    state = _processes()
    rank, world, device = state.process_index, state.num_processes, state.device
    try:
        # 1. The prepared rows, the target, and what a token stores.
        dataset, _ = load_prepared(cfg.data)
        all_lengths, fingerprint = scan_rows(dataset)
        model = load_target(cfg.model, DTYPE_NAMES[cfg.target_dtype], cfg.trust_remote_code).to(device)
        check_full_attention(model.config, f"the target {cfg.model}")
        identity = target_identity(model.config)
        aux = _aux_layers(cfg, model.config)
        lm_head = load_lm_head(cfg.model, cfg.trust_remote_code)
        fields = store_fields(cfg.draft_type, identity["hidden_size"], len(aux))
        # 2. The plan (rows → shards) and the key that ties every shard to these settings.
        lengths, count, plans = _plan(cfg, all_lengths, fields)
        target = _target_record(cfg, identity, lm_head)
        store_key = _store_key(cfg, aux, fields, target, fingerprint, count)
        # 3. What is on disk already, and whether the rest fits.
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        done = _check_existing(out, plans, fields, store_key)
        _check_logits(model, lm_head, batch_tensors(dataset, [plans[-1].rows[-1]], min(cfg.max_length, 64), device)[0])
        tokens = sum(p.tokens for p in plans)
        _check_disk(cfg, out, plans, done, fields, store_key, world,
                    f"{count} of {len(lengths)} rows, {tokens} tokens")
        # 4. This rank's missing shards: shard i belongs to rank i % world.
        mine = [p for p, d in zip(plans, done) if not d and p.index % world == rank]
        compute = lambda rows: extract(  # noqa: E731
            model.base_model, *batch_tensors(dataset, rows, cfg.max_length, device), cfg.draft_type, aux)
        seconds = _write_shards(out, mine, fields, store_key, compute, rank)
        # 5. Rank 0 writes the manifest once every rank's shards are published.
        truncated = int(sum(int(n) > cfg.max_length for n in all_lengths[:count]))
        header = _header(cfg, store_key, identity["hidden_size"], aux, fields, target, fingerprint,
                         len(lengths), count, truncated, tokens)
        _publish_manifest(cfg, out, header, plans, rank, world)
        computed = sum(p.tokens for p in mine)
        summary = {"out": str(out), "draft_type": cfg.draft_type, "rows": count, "tokens": tokens,
                   "shards": len(plans), "shards_written": len(mine), "shards_skipped": sum(done),
                   "bytes": sum((out / shard_name(p.index)).stat().st_size for p in plans),
                   "bytes_per_token": bytes_per_token(fields), "seconds": seconds,
                   "tokens_per_second": computed / seconds if computed else 0.0, "rank": rank, "world": world}
        logger.info(f"features: wrote {len(mine)} shards on rank {rank} ({summary['tokens_per_second']:.0f} tok/s); "
                    f"store {out} holds {count} rows, {_gib(summary['bytes'])}")
        return summary
    finally:
        if world > 1:
            state.destroy_process_group()


def _header(cfg: FeaturesConfig, store_key, hidden, aux, fields, target, fingerprint, num_rows, count, truncated,
            tokens) -> dict:
    """The manifest's header (the shards' list is added from their own metadata)."""
    return {"format": FORMAT, "version": VERSION, "store_key": store_key, "draft_type": cfg.draft_type,
            "dtype": "bfloat16", "hidden_size": hidden, "aux_layer_ids": aux, "fields": fields,
            "target": target, "target_dtype": cfg.target_dtype, "max_length": cfg.max_length,
            "batch_tokens": cfg.batch_tokens, "shard_tokens": cfg.shard_tokens,
            "data": {"path": str(Path(cfg.data).resolve()), "fingerprint": fingerprint,
                     "num_rows": num_rows, "stored_rows": count, "truncated_rows": truncated},
            "rows": count, "tokens": tokens, "provenance": provenance()}
