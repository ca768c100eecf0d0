"""Distributed reports: every rank's shard (its sums and sample rows, :class:`~lightning_attn.report.run.ReportRun`)
sent
to global rank zero and merged there into one report equal to that of one process over the same samples.

:func:`gather_shards` is the collective that every rank calls at the end of an evaluation epoch; rank zero then
finalizes its merged runs as in one process.

**Distributed runs** (DDP and any strategy on a ``torch.distributed`` process group): every rank evaluates its
own batches into its own sums and streams its sample rows to a file in a rank-local temporary directory (no
shared file system needed). At the end of the epoch each rank sends rank zero (``torch.distributed.gather_object``:
gloo, and NCCL through the current CUDA device, which Lightning sets) its counts, correct-vs-incorrect moments,
class-wise, calibration and per-head sums, per-batch rows, input hash and sample rows (raw CSV, in messages of at
most :data:`~lightning_attn.report.distributed.GATHER_CHUNK_BYTES`). Rank zero appends the other ranks' rows to
``samples.csv`` in rank order
(``sample`` renumbered consecutively, rank zero's rows first; ``batch`` is the rank's own batch index), merges
the sums and alone writes the report: its dataset-level numbers, class-wise and per-head tables equal those of
one process over the same samples (up to float summation order). Per-batch rows follow each rank's batches (a
``rank`` column says whose). Saliency runs on rank zero only, for the first ``probe_samples`` (or the
``probe_indices``) of rank zero's shard, which are the first rows of ``samples.csv``. The inputs hash combines
the per-rank hashes in rank order (:func:`~lightning_attn.report.provenance.combine_input_hashes`): it differs
from a single-process hash of the same data, the model and configuration hashes do not; ``provenance``
records the ``world_size``. The logged scalars are the merged values, broadcast to every rank. Lightning's
``DistributedSampler`` pads data that does not split evenly over the ranks by repeating samples: the report
then counts those repeats, as Lightning's metrics do (a note in the report and a warning say how many). One
process gathers nothing. Under a strategy without an initialized ``torch.distributed`` group the report falls
back to rank zero's shard (a warning says so).
"""

from __future__ import annotations

import csv
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
import numpy as np
import torch.distributed as dist

from lightning_attn.report.explain import ReportError
from lightning_attn.report.provenance import StreamHasher
from lightning_attn.report.run import ReportRun, scalars

__all__ = ["GATHER_CHUNK_BYTES", "gather_shards"]

#: Under DDP, the sample rows of a non-zero rank travel to rank zero as raw CSV bytes in messages of at most this size
#: (one ``gather_object`` round per chunk), so no message holds a whole shard.
GATHER_CHUNK_BYTES = 8 << 20


def gather_shards(
    trainer: pl.Trainer,
    stage: str,
    runs: list[ReportRun],
    *,
    new_run: Callable[[int], ReportRun],
    pending: list[ReportRun],
    warn_padding: Callable[[ReportRun, str], None],
) -> dict[str, float]:
    """Send every rank's sums and sample rows to rank zero, which merges them into its runs (then finalized as
    in one process); returns the merged scalars to log, the same on every rank. A collective: every rank calls
    it, in the same order as the other callbacks' epoch-end collectives.

    ``runs`` are this rank's runs of the epoch; on rank zero, ``new_run(dataloader_idx)`` makes the run of a
    dataloader that only other ranks evaluated, the merged runs (or, when merging fails, rank zero's own) are
    appended to ``pending`` (to be finalized, or left INCOMPLETE), and ``warn_padding(run, note)`` is called with
    the note of a dataloader that the DistributedSampler padded.

    Messages: ``all_gather_object`` of each rank's chunk counts (tiny), ``gather_object`` of each rank's sums
    (bounded by classes, sites, heads and batches), then one ``gather_object`` round per chunk of at most
    :data:`GATHER_CHUNK_BYTES` of raw CSV rows (rank zero writes them to a local scratch file, never holding a
    shard in memory), and a ``broadcast`` of the scalars or of the first error, raised on every rank."""
    rank, world = int(trainer.global_rank), int(trainer.world_size)
    mine = {run.dataloader_idx: run for run in runs}
    error: BaseException | None = None
    payloads: dict[int, dict[str, Any]] | str = {}
    chunks: dict[int, int] = {}
    if rank:
        try:
            for run in runs:
                run.close_samples()
                part = run.tmp_dir / "samples.csv.part"
                size = part.stat().st_size if part.exists() else 0
                chunks[run.dataloader_idx] = -(-size // GATHER_CHUNK_BYTES)
                payloads[run.dataloader_idx] = _shard_payload(run)  # type: ignore[index]
        except Exception as exc:
            payloads, chunks = f"rank {rank}: {type(exc).__name__}: {exc}", {}
    scratch: Path | None = None
    if rank == 0:
        try:
            scratch = Path(tempfile.mkdtemp(prefix="lightning_attn_report_gather_"))
        except Exception as exc:
            error = exc
    try:
        counts: list[Any] = [None] * world
        dist.all_gather_object(counts, chunks)
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(payloads, gathered, dst=0)
        keys = sorted(set(mine) | {k for c in counts for k in c})  # every rank's dataloaders with sample chunks to send
        if gathered is not None:
            keys = sorted(set(keys) | {k for p in gathered if isinstance(p, dict) for k in p})
        for idx in keys:
            rounds = max(c.get(idx, 0) for c in counts)
            source: IO[bytes] | None = None
            try:
                for round_index in range(rounds):
                    piece = b""
                    try:
                        if round_index == 0 and rank and chunks.get(idx):
                            source = (mine[idx].tmp_dir / "samples.csv.part").open("rb")
                        if source is not None:
                            piece = source.read(GATHER_CHUNK_BYTES)
                    except Exception as exc:
                        piece = b""
                        if source is not None:
                            source.close()
                        source = None
                        warnings.warn(
                            f"ExplainabilityReport: rank {rank} could not read its samples: {exc}",
                            UserWarning,
                            stacklevel=2,
                        )
                    received: list[Any] | None = [None] * world if rank == 0 else None
                    dist.gather_object(piece, received, dst=0)
                    if received is not None and scratch is not None and error is None:
                        try:
                            for k in range(1, world):
                                if received[k]:
                                    with (scratch / f"rank{k}_dl{idx}.csv").open("ab") as handle:
                                        handle.write(received[k])
                        except Exception as exc:
                            error = exc
            finally:
                if source is not None:
                    source.close()
        merged_scalars: dict[str, float] = {}
        if rank == 0:
            targets: list[ReportRun] = []
            try:
                if error is not None:
                    raise error
                assert gathered is not None and scratch is not None
                failed = [p for p in gathered[1:] if isinstance(p, str)]
                if failed:
                    raise ReportError(f"a rank could not send its part of the report ({failed[0]})")
                for idx in keys:
                    found = mine.get(idx)
                    # None: rank zero evaluated no batch of this dataloader; other ranks did
                    targets.append(found if found is not None else new_run(idx))
                for run in targets:
                    _merge_shards(run, gathered, scratch)
                    note = _padding_note(trainer, stage, run)
                    if note is not None:
                        warn_padding(run, note)
                merged_scalars = scalars(targets)
            except Exception as exc:
                error = exc
            # finalized at the end of the loop, or left INCOMPLETE by on_exception
            pending.extend(targets or list(mine.values()))
        outcome: dict[str, Any] = {
            "scalars": merged_scalars,
            "error": None if error is None else f"{type(error).__name__}: {error}",
        }
        outcome = trainer.strategy.broadcast(outcome, src=0)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        for run in runs:
            if run.shard:
                shutil.rmtree(run.tmp_dir, ignore_errors=True)
    if outcome["error"] is not None:
        if isinstance(error, BaseException):
            raise error
        raise ReportError(f"the distributed report failed on rank zero: {outcome['error']}")
    return outcome["scalars"]


def _shard_payload(run: ReportRun) -> dict[str, Any]:
    """What a non-zero rank sends rank zero for one run: everything mergeable, no sample rows (sent in chunks)."""
    return {
        "count": run.count,
        "num_classes": run.num_classes,
        "class_names": run.class_names,
        "columns": run.columns,
        "sites": run.sites,
        "site_info": run.site_info,
        "pair_sites": run.pair_sites,
        "modality": run.modality,
        "stats": run.stats,
        "class_arrays": run.class_arrays,
        "calibration_metric": run.calibration_metric,
        "heads": run.heads,
        "batch_rows": run.batch_rows,
        "notes": run.notes,
        "digest": (run.rank, run.hasher.hexdigest(), run.hasher.count),
    }


def _merge_shards(run: ReportRun, gathered: list[Any], scratch: Path) -> None:
    """Merge the other ranks' sums into rank zero's ``run`` and append their rows (from the scratch files) to
    its samples, in rank order with consecutive sample indices."""
    run.world_size = len(gathered)
    run.input_digests = [(0, run.hasher.hexdigest(), run.hasher.count)]
    for k in range(1, len(gathered)):
        payload = gathered[k].get(run.dataloader_idx)
        if payload is None:  # this rank evaluated no batch of this dataloader
            run.input_digests.append((k, StreamHasher().hexdigest(), 0))
            continue
        run.input_digests.append(tuple(payload["digest"]))
        if not payload["count"]:
            continue
        if run.num_classes == 0:
            _adopt(run, payload)
        elif payload["num_classes"] != run.num_classes:
            raise ReportError(
                f"rank {k} saw {payload['num_classes']} classes in the {run.key} report, rank 0 {run.num_classes}"
            )
        run.stats.merge(payload["stats"])
        for name, values in payload["class_arrays"].items():
            run.class_arrays[name] = run.class_arrays[name] + values
        if run.calibration_metric is None:
            run.calibration_metric = payload["calibration_metric"]
        else:
            run.calibration_metric.merge_state(payload["calibration_metric"])
        for site, sums in payload["heads"].items():
            if site not in run.heads:
                run.heads[site] = sums
            elif not run.heads[site].merge(sums):
                run.notes.append(
                    f"site {site}: rank {k} saw {sums.heads} heads, rank 0 {run.heads[site].heads}; "
                    "its samples are not in the per-head table"
                )
        run.batch_rows.extend(payload["batch_rows"])
        for note in payload["notes"]:
            if note not in run.notes and f"rank {k}: {note}" not in run.notes:
                run.notes.append(f"rank {k}: {note}")
        rows = _append_rows(run, scratch / f"rank{k}_dl{run.dataloader_idx}.csv")
        if rows != payload["count"]:
            raise ReportError(
                f"rank {k} sent {rows} sample rows for its {payload['count']} samples of the {run.key} report"
            )
        run.count += rows


def _adopt(run: ReportRun, payload: Mapping[str, Any]) -> None:
    """Set up rank zero's ``run`` from another rank's first batch (rank zero evaluated none of this dataloader)."""
    run.num_classes = payload["num_classes"]
    run.class_names = payload["class_names"]
    run.class_arrays = {name: np.zeros_like(values) for name, values in payload["class_arrays"].items()}
    run.sites, run.site_info, run.pair_sites = (
        list(payload["sites"]),
        dict(payload["site_info"]),
        list(payload["pair_sites"]),
    )
    run.modality = dict(payload["modality"])
    run.columns = list(payload["columns"])
    run.open_samples()


def _append_rows(run: ReportRun, path: Path) -> int:
    """Append another rank's sample rows (its CSV, header first) to rank zero's, renumbering ``sample``;
    columns are matched by name (the ranks' first batches normally give the same). Returns the row count."""
    if not path.exists():
        return 0
    count = 0
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return 0
        index = {name: i for i, name in enumerate(header)}
        same = header == run.columns
        for row in reader:
            if not same:
                row = [row[index[name]] if name in index else "" for name in run.columns]
            row[0] = str(run.count + count)
            run.samples_writer.writerow(row)
            count += 1
    return count


def _padding_note(trainer: pl.Trainer, stage: str, run: ReportRun) -> str | None:
    """The note (added to ``run.notes``) when Lightning's DistributedSampler padded this dataloader with repeated
    samples that the report counted; ``None`` otherwise."""
    try:
        from torch.utils.data import DistributedSampler

        loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        sampler = getattr(loaders[run.dataloader_idx], "sampler", None) if run.dataloader_idx < len(loaders) else None
        if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            return None
        total, size = int(sampler.total_size), len(sampler.dataset)  # type: ignore[arg-type]
    except Exception:
        return None
    if total > size and run.count == total:
        note = (
            f"the DistributedSampler padded the {size} samples to {total} ({total - size} repeated) so that the "
            f"{run.world_size} ranks get as many: samples.csv and every statistic count the repeats (as Lightning's "
            "metrics do)"
        )
        run.notes.append(note)
        return note
    return None
