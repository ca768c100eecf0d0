"""ExplainabilityReport under DDP: 2 CPU ranks give the report of 1 process on the same (evenly split) data.

DDP runs as a subprocess script (``report_ddp_script.py``, through :func:`helpers.run_script`); the one-process run
of the same job runs here. Under DDP rank r evaluates the samples r, r + 2, ... (Lightning's DistributedSampler,
unshuffled), so per-sample rows match as a multiset (their ``batch`` is the rank's own batch index, and ``sample``
and ``rank`` say where they sit in the merged file).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import report_ddp_script as script
from helpers import run_script
from test_report import read_csv
from torch.utils.data import DataLoader, Subset

from lightning_attn.report import StreamHasher, load_schema
from lightning_attn.report.provenance import combine_input_hashes

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-6
#: Columns that say where a row sits, not what it measures: left out of the row multiset.
PLACE_COLUMNS = ("sample", "batch", "rank")


def close(got: Any, want: Any, where: str = "") -> None:
    """Nested JSON values equal, floats to :data:`TOL`."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            close(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, (int, float)) and got == pytest.approx(want, abs=TOL), where
    else:
        assert got == want, where


def same_cell(got: str, want: str, column: str) -> bool:
    if got == want:
        return True
    if column.endswith("/top_pairs"):  # "q>k:w;..." with 4 significant digits
        pairs = [p.split(":") for p in got.split(";")], [p.split(":") for p in want.split(";")]
        return len(pairs[0]) == len(pairs[1]) and all(
            a[0] == b[0] and math.isclose(float(a[1]), float(b[1]), rel_tol=1e-3) for a, b in zip(*pairs, strict=False)
        )
    try:
        return abs(float(got) - float(want)) <= TOL
    except ValueError:
        return False


def shard_hash(rank: int, world: int) -> tuple[int, str, int]:
    """What rank ``rank`` of ``world`` hashes: its DistributedSampler shard, in batches of the same size."""
    dataset = script.loader().dataset
    hasher = StreamHasher()
    for batch in DataLoader(Subset(dataset, list(range(rank, len(dataset), world))), batch_size=script.BATCH):
        hasher.update(batch)
    return rank, hasher.hexdigest(), hasher.count


@pytest.mark.ddp
def test_ddp_two_ranks_write_the_single_process_report(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"  # TMPDIR of both ranks: their scratch directories must be gone afterwards
    scratch.mkdir()
    out = tmp_path / "ddp.json"
    run_script(
        script.__file__,
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--out",
        out,
        "--root",
        tmp_path / "ddp",
        cwd=tmp_path,
        TMPDIR=str(scratch),
        OMP_NUM_THREADS="1",
    )
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    single_info = script.run(devices=1, root=str(tmp_path / "single"))
    ddp_dir, single_dir = Path(ranks[0]["directory"]), Path(single_info["directory"])
    assert [r["world_size"] for r in ranks] == [2, 2] and single_info["world_size"] == 1
    ddp, single = (json.loads((d / "report.json").read_text()) for d in (ddp_dir, single_dir))

    # written once, by rank zero; no scratch left on either rank
    assert ranks[0]["results"] == ["test"] and ranks[1]["results"] == [] and ranks[1]["directory"] is None
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["report"]
    assert not (ddp_dir / "INCOMPLETE").exists()
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("lightning_attn_report")]
    jsonschema.validate(ddp, load_schema(), cls=jsonschema.Draft202012Validator)

    # samples.csv: one row per sample in both; rank zero's rows first, renumbered; the same rows as one process
    _, header, rows = read_csv(ddp_dir / "samples.csv")
    _, single_header, single_rows = read_csv(single_dir / "samples.csv")
    assert header == single_header and header[-1] == "rank"
    assert len(rows) == len(single_rows) == script.SAMPLES == ddp["dataset"]["num_samples"] == ddp["samples"]["rows"]
    col = {name: i for i, name in enumerate(header)}
    assert [int(r[col["sample"]]) for r in rows] == list(range(script.SAMPLES))
    assert [int(r[col["rank"]]) for r in rows] == [0] * 8 + [1] * 8
    assert {r[col["rank"]] for r in single_rows} == {"0"}
    compared = [name for name in header if name not in PLACE_COLUMNS]
    unmatched = list(rows)
    for want in single_rows:
        match = next((got for got in unmatched if all(same_cell(got[col[c]], want[col[c]], c) for c in compared)), None)
        assert match is not None, f"no DDP row matches single-process row {want[:6]}"
        unmatched.remove(match)

    # dataset-level numbers, calibration, correct vs incorrect, class-wise and per-head tables
    for key in ("num_samples", "num_batches", "num_classes", "num_correct", "num_incorrect"):
        assert ddp["dataset"][key] == single["dataset"][key], key
    close(ddp["dataset"], single["dataset"], "dataset")
    close(ddp["calibration"], single["calibration"], "calibration")
    close(ddp["correct_vs_incorrect"], single["correct_vs_incorrect"], "correct_vs_incorrect")
    close(ddp["classwise"], single["classwise"], "classwise")
    close(ddp["attention"], single["attention"], "attention")
    for name in ("classwise.csv", "per_head.csv"):
        got_header, got = read_csv(ddp_dir / name)[1:]
        want_header, want = read_csv(single_dir / name)[1:]
        assert got_header == want_header and len(got) == len(want), name
        # relevance: from the saliency probes, which are rank zero's first samples (not the same samples)
        keep = [i for i, c in enumerate(want_header) if not c.startswith("relevance")]
        for g, w in zip(got, want, strict=False):
            assert all(same_cell(g[i], w[i], want_header[i]) for i in keep), (name, g, w)

    # per-batch rows follow each rank's batches
    _, batch_header, batch_rows = read_csv(ddp_dir / "batches.csv")
    assert batch_header[-1] == "rank" and [r[-1] for r in batch_rows] == ["0", "0", "1", "1"]
    assert [int(r[1]) for r in batch_rows] == [script.BATCH] * 4

    # saliency on rank zero only: its first samples, the first rows of samples.csv (dataset samples 0 and 2)
    probes = ddp["saliency"]["probes"]
    assert [p["sample"] for p in probes] == [0, 1]
    for probe, row, single_row in zip(probes, rows[:2], (single_rows[0], single_rows[2]), strict=False):
        for r in (row, single_row):
            assert (probe["target"], probe["predicted"]) == (int(r[col["target"]]), int(r[col["predicted"]]))
            assert probe["confidence"] == pytest.approx(float(r[col["confidence"]]), abs=TOL)
    close(probes[0]["inputs"]["a"]["share"], single["saliency"]["probes"][0]["inputs"]["a"]["share"], "probe 0")

    # provenance: same model and configuration; the inputs hash combines the ranks' hashes in rank order
    got, want = ddp["provenance"], single["provenance"]
    assert (got["model_sha256"], got["config_sha256"]) == (want["model_sha256"], want["config_sha256"])
    assert (got["world_size"], want["world_size"]) == (2, 1)
    assert (
        got["num_samples"] == want["num_samples"] == script.SAMPLES and got["num_batches"] == want["num_batches"] == 4
    )
    assert want["inputs_sha256"] == shard_hash(0, 1)[1]
    assert got["inputs_sha256"] == combine_input_hashes([shard_hash(0, 2), shard_hash(1, 2)]) != want["inputs_sha256"]

    # logged scalars: the merged values, on both ranks
    for rank in ranks:
        assert rank["logged"]["report/test/accuracy"] == pytest.approx(single["dataset"]["accuracy"], abs=TOL)
        assert rank["logged"]["report/test/ece"] == pytest.approx(single["dataset"]["ece"], abs=TOL)
    assert single_info["logged"].keys() == ranks[0]["logged"].keys()
