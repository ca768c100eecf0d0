"""Read an offline W&B run back from its ``.wandb`` record log, with wandb's own protobuf messages.

The log is W&B's LevelDB-style file (the format of ``wandb sync``): a 7-byte header (``:W&B``, magic ``0xBEE1``,
version 0), then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32, length, type: full, first, middle,
last) and a piece of a serialized ``wandb_internal_pb2.Record``. wandb 0.31 reads it in its Go core only, so the
framing is decoded here and every record parsed by ``Record.ParseFromString``. Not collected by pytest.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """Every ``Record`` of the run log at ``path``, in order; a bad checksum raises."""
    data = path.read_bytes()
    assert data.startswith(HEADER), data[:7]
    offset, pending = len(HEADER), b""
    while offset + 7 <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < 7:  # the block's tail is zero padding
            offset += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if length == 0 and kind == 0:  # zero padding at the end
            offset += left_in_block
            continue
        chunk = data[offset + 7 : offset + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, offset
        offset += 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def read_run(run_dir: Path) -> dict[str, Any]:
    """``history`` (key -> list of decoded values, in order), ``config`` (key -> value) and ``artifacts`` (type and
    name of each logged artifact) of the offline run in ``run_dir``."""
    history: dict[str, list[Any]] = {}
    config: dict[str, Any] = {}
    artifacts: list[tuple[str, str]] = []
    for path in sorted(run_dir.glob("run-*.wandb")):
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row: dict[str, Any] = {}
                for item in record.history.item:
                    # a media value (image, table, html) comes as one item per field: nested_key = [key, field, ...]
                    path = [item.key] if item.key else list(item.nested_key)
                    target = row
                    for part in path[:-1]:
                        target = target.setdefault(part, {})
                    target[path[-1]] = json.loads(item.value_json)
                for key, value in row.items():
                    history.setdefault(key, []).append(value)
            elif kind == "config":
                for item in record.config.update:
                    key = item.key or "/".join(item.nested_key)
                    config[key] = json.loads(item.value_json)
            elif kind == "artifact":
                artifacts.append((record.artifact.type, record.artifact.name))
            elif kind == "run":
                for item in record.run.config.update:
                    config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"history": history, "config": config, "artifacts": artifacts}
