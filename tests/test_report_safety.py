"""The report never deletes or overwrites what the library did not write, escapes what it did not choose, and leaves
NaN/Inf outputs out of its numbers (issue 13)."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from report_helpers import OneFeatureModel, TinyClassifier, TinyData
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn import AttentionLogger, HeadSpecializationTracker, build_report
from lightning_attn.report.write import MARKER

pytestmark = pytest.mark.usefixtures("one_thread")

PAYLOAD = "<script>alert(1)</script>"


def _loader(samples: int = 16, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 4, 5, generator=generator)
    y = torch.randint(0, 2, (samples,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _report(out: Path, model: nn.Module | None = None, loader: DataLoader | None = None, **kwargs: Any) -> Path:
    torch.manual_seed(0)
    return build_report(
        model or OneFeatureModel(),
        loader or _loader(),
        out,
        accelerator="cpu",
        progress=False,
        figures=False,
        probe_samples=0,
        **kwargs,
    )


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- never delete or overwrite -------------------------------------------------------------------------------------
def test_a_user_folder_at_the_path_survives_and_the_report_goes_to_a_sibling(tmp_path: Path) -> None:
    user = tmp_path / "run"
    (user / "checkpoints").mkdir(parents=True)
    (user / "checkpoints" / "best.ckpt").write_bytes(b"weights")
    (user / "notes.txt").write_text("my notes")
    before = _tree(user)
    with pytest.warns(UserWarning, match="report goes to") as caught:
        out = _report(user)
    assert out == tmp_path / "run-1" and (out / "report.json").is_file() and (out / MARKER).is_file()
    assert _tree(user) == before
    message = next(str(w.message) for w in caught if "report goes to" in str(w.message))
    assert str(user) in message and str(out) in message


def test_a_file_at_the_path_survives(tmp_path: Path) -> None:
    target = tmp_path / "report"
    target.write_text("not a folder")
    with pytest.warns(UserWarning, match="is a file"):
        out = _report(target)
    assert target.read_text() == "not a folder" and out == tmp_path / "report-1" and (out / "report.html").is_file()


def test_a_second_report_replaces_its_own_folder_but_not_a_file_added_to_it(tmp_path: Path) -> None:
    first = _report(tmp_path / "r")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*report goes to.*")
        second = _report(tmp_path / "r", loader=_loader(seed=1))
    assert first == second == tmp_path / "r" and not (tmp_path / "r-1").exists()
    assert json.loads((second / "report.json").read_text())["provenance"]["inputs_sha256"] != ""
    listed = (second / MARKER).read_text().splitlines()[1:]
    assert set(_tree(second)) - {MARKER} <= set(listed)  # the marker lists every file the report wrote
    # a file of the user's inside the report folder makes it the user's folder: kept, the report goes next door
    (second / "my_analysis.txt").write_text("keep me")
    with pytest.warns(UserWarning, match="report goes to"):
        third = _report(tmp_path / "r")
    assert third == tmp_path / "r-1" and (second / "my_analysis.txt").read_text() == "keep me"
    assert (second / "report.json").is_file()


# -- escaping ------------------------------------------------------------------------------------------------------
def test_script_payloads_are_inert_in_html_and_summary(tmp_path: Path) -> None:
    torch.manual_seed(0)
    out = build_report(
        TinyClassifier(),
        TinyData(num_test=16, batch_size=8).test_dataloader(),
        tmp_path / "r",
        accelerator="cpu",
        progress=False,
        figures=False,
        probe_samples=1,
        title=f"T {PAYLOAD}",
        class_names=[PAYLOAD, "<img src=x onerror=alert(2)>", "a|b`c"],
        feature_names={"a": [f"<b>f{i}</b>" for i in range(5)], "b": ["b0", "b1", "b2"]},
    )
    page = (out / "report.html").read_text(encoding="utf-8")
    summary = (out / "summary.md").read_text(encoding="utf-8")
    explorer = (out / "explorer.html").read_text(encoding="utf-8")  # class names in its sample titles
    assert PAYLOAD not in explorer and "<img src=x" not in explorer
    for text in (page, summary):
        assert PAYLOAD not in text and "<img src=x" not in text and "<b>f" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # the Markdown class-wise table keeps its shape: the pipe and backtick of a class name are escaped
    row = next(line for line in summary.splitlines() if line.startswith("| a\\|"))
    assert row.startswith("| a\\|b\\`c |") and row.count(" | ") == 6


# -- NaN / Inf outputs ---------------------------------------------------------------------------------------------
class Poisoned(nn.Module):
    """``base``'s logits; NaN for samples whose feature 4 is 7, +Inf for class 0 (NaN probabilities) where it is 9."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: Tensor) -> Tensor:
        logits = self.base(x)
        flag = x[:, 0, 4]
        logits = torch.where((flag == 7.0)[:, None], torch.full_like(logits, math.nan), logits)
        inf = torch.zeros_like(logits)
        inf[:, 0] = math.inf
        return torch.where((flag == 9.0)[:, None], inf, logits)


def test_nan_and_inf_rows_are_left_out_named_and_warned_once(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, 5, generator=generator)
    y = torch.randint(0, 2, (24,), generator=generator)
    poisoned = {1: 7.0, 3: 7.0, 9: 9.0, 17: 7.0}  # sample -> flag (batches of 8: batch 0 rows 1, 3; 1: 1; 2: 1)
    for sample, flag in poisoned.items():
        x[sample, 0, 4] = flag
    clean = [i for i in range(24) if i not in poisoned]
    torch.manual_seed(0)
    base = OneFeatureModel()  # reads feature 2 only: the flags do not change the clean rows' logits
    model = Poisoned(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = build_report(
            model,
            DataLoader(TensorDataset(x, y), batch_size=8),
            tmp_path / "poisoned",
            accelerator="cpu",
            progress=False,
            figures=False,
            probe_samples=2,
        )
    reference_out = build_report(
        model,
        DataLoader(TensorDataset(x[clean], y[clean]), batch_size=8),
        tmp_path / "clean",
        accelerator="cpu",
        progress=False,
        figures=False,
        probe_samples=2,
    )
    nonfinite = [w for w in caught if "non-finite" in str(w.message)]
    assert len(nonfinite) == 1
    report = json.loads((out / "report.json").read_text())
    reference = json.loads((reference_out / "report.json").read_text())
    got, want = report["dataset"], reference["dataset"]
    assert got["num_samples"] == want["num_samples"] == len(clean)
    with torch.no_grad():
        predicted = base(x[clean]).argmax(1)
    assert got["accuracy"] == int((predicted == y[clean]).sum()) / len(clean)
    for key in ("accuracy", "mean_confidence", "ece", "mce", "nll", "brier", "mean_margin", "num_correct"):
        assert got[key] is not None and got[key] == pytest.approx(want[key], abs=1e-9), key
    assert [c["support"] for c in report["classwise"]] == [c["support"] for c in reference["classwise"]]
    note = next(n for n in report["notes"] if "non-finite" in n)
    assert note.startswith("4 samples") and "batch 0 rows 1, 3" in note
    assert "batch 1 row 1" in note and "batch 2 row 1" in note

    # samples.csv holds the clean rows only, with the clean run's values; the probes are the first clean samples
    def rows(path: Path) -> list[list[str]]:
        with (path / "samples.csv").open(newline="") as handle:
            return list(csv.reader(handle))[1:]

    assert [r[2:10] for r in rows(out)] == [r[2:10] for r in rows(reference_out)]
    assert report["saliency"]["num_probes"] == 2
    assert [p["confidence"] for p in report["saliency"]["probes"]] == pytest.approx(
        [p["confidence"] for p in reference["saliency"]["probes"]], abs=1e-7
    )


def test_no_torchmetrics_compute_before_update_warning_reaches_the_user(tmp_path: Path) -> None:
    """A plain module's report runs the only forward pass itself, recorded for the report alone: the other callbacks'
    states see no update, which torchmetrics would warn about at every compute."""
    callbacks = [
        AttentionLogger(stages=["test"], save_dir=str(tmp_path / "attn")),
        HeadSpecializationTracker(stages=["test"], save_dir=str(tmp_path / "heads")),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _report(tmp_path / "r", callbacks=callbacks)
    assert not [str(w.message) for w in caught if "before the ``update``" in str(w.message)]
