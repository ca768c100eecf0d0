"""Provenance of a report: SHA-256 of the model's weights, of the evaluated inputs and of the report's
configuration, with library versions and times.

Every hash is over a canonical byte stream, so that two identical runs give identical hashes on any
machine with the same byte order (little-endian everywhere PyTorch runs today):

- **model**: :func:`hash_state_dict` walks ``state_dict()`` in sorted key order and hashes, per entry,
  the key, the dtype, the shape and the tensor's raw bytes (C-contiguous, on the host). Non-tensor
  entries (``_extra_state``) are hashed through their ``repr``.
- **inputs**: :class:`StreamHasher` is fed every evaluated batch in order (the whole batch: inputs and
  targets), walking mappings in sorted key order; the same per-tensor record as above.
  Under DDP every rank hashes its own batches and :func:`combine_input_hashes` combines the per-rank digests in
  rank order: the hash of a distributed run therefore differs from a single-process hash of the same data (the
  model and configuration hashes do not).
- **configuration**: :func:`hash_config` hashes the canonical JSON (sorted keys, no whitespace) of the
  report's settings; callables are named by their qualified name.

``report_sha256`` combines the three: it changes if, and only if, one of them does.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "StreamHasher",
    "canonical_json",
    "combine_input_hashes",
    "hash_config",
    "hash_state_dict",
    "library_versions",
    "report_hash",
    "sample_hashes",
    "utc_now",
]

#: Distributions whose versions every report records (absent ones are skipped).
DISTRIBUTIONS = ("lightning-attnlens", "torch", "lightning", "torchmetrics", "numpy", "matplotlib", "transformers")


def _update_tensor(digest: Any, tensor: Tensor) -> None:
    data = tensor.detach()
    if data.is_nested:
        for part in data.unbind():
            _update_tensor(digest, part)
        return
    if data.layout != torch.strided:
        data = data.to_dense()
    data = data.to("cpu").contiguous()
    digest.update(f"{data.dtype}|{tuple(data.shape)}|".encode())
    if data.numel():
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())


def hash_state_dict(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a ``state_dict``: every entry in sorted key order, key, dtype, shape and raw bytes.

    Changing one element of one weight changes the hash; so does renaming a key or changing a dtype.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        digest.update(f"{key}\n".encode())
        if isinstance(value, Tensor):
            _update_tensor(digest, value)
        else:
            digest.update(repr(value).encode())
        digest.update(b"\n")
    return digest.hexdigest()


class StreamHasher:
    """Streamed SHA-256 over evaluated batches (nothing kept but the digest state).

    ``update(batch)`` walks tensors, mappings (sorted keys), lists and tuples; other leaves are hashed by
    ``repr`` (strings, numbers). ``count`` is the number of batches seen.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self.count = 0

    def update(self, batch: Any) -> None:
        self.count += 1
        self._digest.update(f"batch {self.count}\n".encode())
        self._visit(batch, "")

    def _visit(self, value: Any, path: str) -> None:
        if isinstance(value, Tensor):
            self._digest.update(f"{path}:".encode())
            _update_tensor(self._digest, value)
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                self._visit(value[key], f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                self._visit(item, f"{path}/{index}")
        else:
            self._digest.update(f"{path}={value!r}".encode())
        self._digest.update(b";")

    def hexdigest(self) -> str:
        return self._digest.copy().hexdigest()


def sample_hashes(inputs: Any, batch_size: int) -> list[str]:
    """Per-sample SHA-256 (first 16 hex digits) of a batch's model ``inputs``: sample ``i``'s digest covers row ``i`` of
    every tensor whose first axis is the batch (mappings in sorted key order, dtype and shape recorded as in
    :func:`hash_state_dict`) and the other leaves whole. Equal inputs give equal digests in any batch, at any position
    and under any model, which is how :mod:`lightning_attn.report.compare` matches the samples of two reports.
    """
    digests = [hashlib.sha256() for _ in range(batch_size)]

    def visit(value: Any, path: str) -> None:
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch_size:
            for digest, row in zip(digests, value.detach().cpu().unbind(0), strict=True):  # one device copy per tensor
                digest.update(f"{path}:".encode())
                _update_tensor(digest, row)
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                visit(value[key], f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f"{path}/{index}")
        else:
            for digest in digests:
                if isinstance(value, Tensor):
                    _update_tensor(digest, value)
                else:
                    digest.update(f"{path}={value!r}".encode())

    visit(inputs, "")
    return [digest.hexdigest()[:16] for digest in digests]


def combine_input_hashes(digests: Sequence[tuple[int, str, int]]) -> str:
    """SHA-256 (hex) of per-rank :class:`StreamHasher` digests ``(rank, hexdigest, batches)``, in the given (rank)
    order: the inputs hash of a distributed run."""
    digest = hashlib.sha256(b"lightning_attn ranks\n")
    for rank, hexdigest, batches in digests:
        digest.update(f"rank {rank} batches {batches} inputs {hexdigest}\n".encode())
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    if callable(value):
        module = getattr(value, "__module__", None) or ""
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"{module}:{name}"
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return repr(value)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace; callables become ``module:qualname``."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=True)


def hash_config(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of :func:`canonical_json` of ``config``."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def report_hash(model_sha256: str, inputs_sha256: str, config_sha256: str) -> str:
    """One hash for the three: identical runs give identical values; any change of weights, inputs or
    settings changes it."""
    return hashlib.sha256(
        f"model={model_sha256}\ninputs={inputs_sha256}\nconfig={config_sha256}\n".encode()
    ).hexdigest()


def library_versions() -> dict[str, str]:
    """Python, platform and the installed versions of :data:`DISTRIBUTIONS`."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions.setdefault("torch", torch.__version__)
    if "lightning_attn" in sys.modules:
        versions["lightning_attn"] = getattr(sys.modules["lightning_attn"], "__version__", "unknown")
    return versions


def utc_now() -> str:
    """Current UTC time, ISO 8601 with seconds and a ``Z``."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
