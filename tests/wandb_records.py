"""Read a W&B offline run file (``run-<id>.wandb``) without wandb's reader.

wandb 0.31 no longer ships a Python reader (``wandb.sdk.internal.datastore`` is gone; the Go
core writes the file). The format is unchanged: a 7-byte header (``:W&B``, magic 0xBEE1,
version 0) then LevelDB-log records (``<crc32 u32><length u16><type u8>``, 32 KiB blocks,
FULL/FIRST/MIDDLE/LAST chunks), each holding a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, (ident, magic, version)
    pos, chunks = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding / preallocated end
            pos += left
            continue
        chunks.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (FULL, LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(b"".join(chunks))
            chunks = []
            yield rec


def history(path: str | Path) -> list[dict]:
    """Every ``wandb.log`` row of the run file, values JSON-decoded."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for it in rec.history.item:
            value = json.loads(it.value_json)
            if it.key or len(it.nested_key) == 1:
                row[it.key or it.nested_key[0]] = value
            else:  # media are flattened: nested_key = [metric, field, ...]
                d = row.setdefault(it.nested_key[0], {})
                for part in it.nested_key[1:-1]:
                    d = d.setdefault(part, {})
                d[it.nested_key[-1]] = value
        rows.append(row)
    return rows


def run_id(path: str | Path) -> str:
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run.run_id
    raise ValueError(f"no run record in {path}")


def wait_complete(path: str | Path, timeout: float = 60.0) -> Path:
    """Wait for the run's ``exit`` record: wandb-core may still be flushing after ``finish()``."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in records(path)):
                return Path(path)
        except (FileNotFoundError, struct.error, AssertionError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.5)
