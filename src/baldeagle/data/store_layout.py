"""The feature store's plan and shard files: rows → batches → shards, and streaming shard writes.

The plan is fixed up front: rows sorted by length (longest first), cut into batches of at most
`batch_tokens` padded tokens, batches grouped whole into shards of about `shard_tokens` tokens.
A shard is a pure function of its rows, so a resumed run recomputes exactly the missing ones.

A shard is a safetensors file whose layout is known from the plan alone: the header (with the
shard's own manifest entry in its metadata), then one region per field, token-major. So the
writer can stream each batch straight to its place (memory holds a batch, not a shard), fsync,
and publish the file with os.replace; a killed run leaves at most a temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from baldeagle.data.store_reader import FIELD_DTYPES, SHARD_METADATA_KEY, bytes_per_token, shard_name

# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass
class ShardPlan:
    index: int
    rows: list[int]  # prepared-row ids, longest first
    lengths: list[int]  # stored tokens per row (after max_length)
    batches: list[tuple[int, int]]  # [start, end) into rows

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def offsets(self) -> list[int]:
        return [0, *np.cumsum(self.lengths).tolist()]

    def info(self, store_key: str) -> dict:
        return {"index": self.index, "file": shard_name(self.index), "rows": self.rows,
                "offsets": self.offsets(), "tokens": self.tokens, "store_key": store_key}


def plan_shards(rows: list[int], lengths: list[int], batch_tokens: int, shard_tokens: int) -> list[ShardPlan]:
    """Length-sorted batches of at most `batch_tokens` padded tokens (a longer row goes alone),
    grouped whole into shards of at most `shard_tokens` tokens (a bigger batch goes alone)."""
    order = sorted(range(len(rows)), key=lambda k: (-lengths[k], rows[k]))
    batches: list[list[int]] = []
    for k in order:  # longest first: a batch's first row sets its padded width
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(k)
        else:
            batches.append([k])
    shards: list[ShardPlan] = []
    for batch in batches:
        tokens = sum(lengths[k] for k in batch)
        shard = shards[-1] if shards else None
        if shard is None or (shard.tokens + tokens > shard_tokens):
            shard = ShardPlan(index=len(shards), rows=[], lengths=[], batches=[])
            shards.append(shard)
        start = len(shard.rows)
        shard.rows += [rows[k] for k in batch]
        shard.lengths += [lengths[k] for k in batch]
        shard.batches.append((start, len(shard.rows)))
    return shards


def shard_header(plan: ShardPlan, fields: dict, store_key: str) -> tuple[bytes, dict[str, int]]:
    """The safetensors header of a shard (deterministic) and each field's data offset."""
    tensors, starts, offset = {}, {}, 0
    for name, spec in fields.items():
        code, _, size = FIELD_DTYPES[spec["dtype"]]
        shape = [plan.tokens, spec["width"]] if spec["width"] else [plan.tokens]
        nbytes = plan.tokens * max(spec["width"], 1) * size
        tensors[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        starts[name] = offset
        offset += nbytes
    meta = {SHARD_METADATA_KEY: json.dumps(plan.info(store_key), separators=(",", ":"))}
    raw = json.dumps({"__metadata__": meta, **tensors}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, starts


def shard_bytes(plan: ShardPlan, fields: dict, store_key: str) -> int:
    return len(shard_header(plan, fields, store_key)[0]) + plan.tokens * bytes_per_token(fields)


def store_bytes(plans: list[ShardPlan], fields: dict, store_key: str = "0" * 64) -> int:
    """Shard bytes plus an estimate of the manifest (about one shard header per shard)."""
    return sum(2 * shard_bytes(p, fields, store_key) - p.tokens * bytes_per_token(fields) for p in plans) + 8192


def select_rows(lengths: list[int], limit: int, max_bytes: int, fields: dict, batch_tokens: int,
                shard_tokens: int) -> int:
    """How many leading prepared rows to store: at most `limit`, and a store of at most `max_bytes`."""
    count = min(limit, len(lengths)) if limit else len(lengths)
    if not max_bytes:
        return count

    def fits(k: int) -> bool:
        return store_bytes(plan_shards(list(range(k)), lengths[:k], batch_tokens, shard_tokens), fields) <= max_bytes

    low, high = 0, count  # the largest k with fits(k), by bisection (bytes grow with k)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    if low == 0:
        raise ValueError(f"--max-bytes {max_bytes} is too small for even one row")
    return low


# --------------------------------------------------------------------------------------------
# Writing a shard
# --------------------------------------------------------------------------------------------


class Inline:
    """Runs each I/O task at once (the default for write_shard)."""

    def __call__(self, fn, *args):
        fn(*args)

    def wait(self):
        pass


class IOThread(Inline):
    """File I/O on one worker thread, in order, while the target computes the next batch. At most
    one task is pending (memory holds about two batches); a task's error surfaces at the next call."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baldeagle-store-io")
        self.pending = None

    def __call__(self, fn, *args):
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self):
        self.pool.shutdown(wait=True)


def _write_at(handle, writes: list[tuple[int, bytes | torch.Tensor]]) -> None:
    for position, data in writes:
        handle.seek(position)
        handle.write(data if isinstance(data, bytes) else data.contiguous().view(torch.uint8).numpy())


def _finish(handle, tmp: Path, final: Path) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    _publish(tmp, final)


def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def write_shard(tmp: Path, final: Path, plan: ShardPlan, fields: dict, store_key: str, compute,
                progress=None, io: Inline | None = None) -> None:
    """Stream a shard into `tmp` (the header, then each batch's rows into every field's region),
    then fsync and rename it to `final`. With an `IOThread`, the writes overlap the compute."""
    io = io or Inline()
    header, starts = shard_header(plan, fields, store_key)
    offsets = plan.offsets()
    handle = open(tmp, "wb")
    try:
        io(_write_at, handle, [(0, header)])
        for start, end in plan.batches:
            tensors = compute(plan.rows[start:end])
            writes = []
            for name, spec in fields.items():
                row_bytes = FIELD_DTYPES[spec["dtype"]][2] * max(spec["width"], 1)
                writes.append((len(header) + starts[name] + offsets[start] * row_bytes, tensors[name]))
            io(_write_at, handle, writes)
            if progress is not None:
                progress.update(offsets[end] - offsets[start])
        io(_finish, handle, tmp, final)
    except BaseException:
        with contextlib.suppress(Exception):
            io.wait()  # let a pending write finish before closing its file
        handle.close()
        raise
