"""``lightning-attn compare``: two checkpoints of a tiny digits ViT (two reports) side by side. Every compared value is
checked against the reports' own files, the changed samples against a join of the two samples.csv by position (the
test data comes in the same order, in batches of different sizes, so the input-hash match is put to a real test)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from examples.digits_vit import DigitsDataModule, DigitsViT
from lightning_attn.cli import main as cli_main
from lightning_attn.report import build_report
from lightning_attn.report.compare import COMPARE_KIND, CompareError, compare_reports, load_report
from lightning_attn.report.provenance import sample_hashes

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _samples(folder: Path) -> list[dict[str, str]]:
    with (folder / "samples.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


class _Plain(nn.Module):
    """The model alone (no test_step of its own), so that the report reads its logits with a target_fn."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _train(model: DigitsViT, loader: DataLoader, steps: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    done = 0
    while done < steps:
        for batch in loader:
            loss = nn.functional.cross_entropy(model(batch["x"]), batch["target"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    model.eval()


@pytest.fixture(scope="module")
def two_reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, DigitsDataModule]:
    base = tmp_path_factory.mktemp("compare")
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    torch.manual_seed(0)
    model = DigitsViT(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32, dropout=0.0)
    _train(model, data.train_dataloader(), steps=4)
    test_a = DataLoader(data.test_dataloader().dataset, batch_size=64)
    first = build_report(
        model, test_a, base / "epoch_a", probe_samples=0, figures=False, progress=False, accelerator="cpu"
    )
    _train(model, data.train_dataloader(), steps=40)
    test_b = DataLoader(data.test_dataloader().dataset, batch_size=50)  # other batches: matching must not rely on them
    second = build_report(
        model, test_b, base / "epoch_b", probe_samples=0, figures=False, progress=False, accelerator="cpu"
    )
    return first, second, data


def test_input_hashes_are_per_sample_and_batch_independent(two_reports: tuple[Path, Path, DigitsDataModule]) -> None:
    first, second, data = two_reports
    rows_a, rows_b = _samples(first), _samples(second)
    assert [r["input_sha256"] for r in rows_a] == [r["input_sha256"] for r in rows_b]
    batch = next(iter(DataLoader(data.test_dataloader().dataset, batch_size=3)))
    assert sample_hashes({"x": batch["x"]}, 3) == [r["input_sha256"] for r in rows_a[:3]]
    assert len({r["input_sha256"] for r in rows_a}) == len(rows_a)  # the digits test images are all distinct


def test_compare_values_equal_the_reports(
    two_reports: tuple[Path, Path, DigitsDataModule], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second, _ = two_reports
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(first), str(second), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "compare.html")
    comparison = json.loads((out / "compare.json").read_text())
    reports = [json.loads((folder / "report.json").read_text()) for folder in (first, second)]
    assert comparison["kind"] == COMPARE_KIND and [r["label"] for r in comparison["reports"]] == ["epoch_a", "epoch_b"]
    for name in ("accuracy", "ece", "mce", "nll", "brier", "mean_confidence"):
        assert comparison["metrics"][name] == [r["dataset"][name] for r in reports], name
    assert comparison["metrics"]["ece_ci_low"] == [None, None]  # no calibration callback: no interval
    for k, entry in enumerate(comparison["classwise"]):
        for key in ("support", "precision", "recall", "f1"):
            assert entry[key] == [r["classwise"][k][key] for r in reports]
    site = reports[0]["attention"]["sites"][0]
    heads = [h for h in comparison["heads"] if h["site"] == site["name"]]
    assert [h["entropy_mean"][0] for h in heads] == site["entropy_mean"]
    assert [h["entropy_mean"][1] for h in heads] == reports[1]["attention"]["sites"][0]["entropy_mean"]

    # changed samples: an independent join of the two samples.csv by position
    rows_a, rows_b = _samples(first), _samples(second)
    expected = {
        a["input_sha256"]
        for a, b in zip(rows_a, rows_b, strict=True)
        if a["predicted"] != b["predicted"] or a["correct"] != b["correct"]
    }
    samples = comparison["samples"]
    assert samples["matched"] == len(rows_a) and {s["input_sha256"] for s in samples["changed"]} == expected
    assert expected, "the two checkpoints should disagree somewhere"
    fixed = sum(a["correct"] == "0" and b["correct"] == "1" for a, b in zip(rows_a, rows_b, strict=True))
    assert samples["fixed"] == fixed and fixed > 0
    for change in samples["changed"][:20]:
        a, b = rows_a[change["sample"][0]], rows_b[change["sample"][1]]
        assert change["predicted"] == [int(a["predicted"]), int(b["predicted"])]
        assert change["confidence"] == [float(a["confidence"]), float(b["confidence"])]
    page = (out / "compare.html").read_text()
    assert page.count("<tr>") >= len(expected) and page.count("data:image/png;base64") == 3
    # top attended positions: the key of each sample's top pair, counted
    column = f"{reports[0]['attention']['pair_sites'][0]}/top_pairs"
    keys = [int(r[column].split(";")[0].split(">")[1].split(":")[0]) for r in rows_a]
    best = max(set(keys), key=keys.count)
    assert comparison["top_positions"]["epoch_a"][reports[0]["attention"]["pair_sites"][0]][0] == [
        best,
        keys.count(best) / len(keys),
    ]

    # a second run into the same folder replaces the comparison
    assert cli_main(["compare", str(second), str(first), "--out", str(out), "--no-figures"]) == 0
    assert json.loads((out / "compare.json").read_text())["reports"][0]["label"] == "epoch_b"


def test_reports_that_cannot_be_matched(
    two_reports: tuple[Path, Path, DigitsDataModule], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _, data = two_reports
    model = DigitsViT(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32).eval()
    validation = build_report(
        model,
        DataLoader(data.val_dataloader().dataset, batch_size=64),
        tmp_path / "val",
        stage="validate",
        probe_samples=0,
        figures=False,
        progress=False,
        accelerator="cpu",
    )
    assert cli_main(["compare", str(first), str(validation), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot be matched: no sample in common" in err
    assert not (tmp_path / "x").exists()

    five = DigitsViT(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32, num_classes=5).eval()
    loader = DataLoader(data.test_dataloader().dataset, batch_size=64)
    five_classes = build_report(
        _Plain(five),
        loader,
        tmp_path / "five",
        probe_samples=0,
        figures=False,
        progress=False,
        accelerator="cpu",
        target_fn=lambda batch: batch["target"] % 5,
    )
    assert cli_main(["compare", str(first), str(five_classes), "--out", str(tmp_path / "y")]) == 2
    assert "different classes" in capsys.readouterr().err


def test_never_overwrites_foreign_files(
    two_reports: tuple[Path, Path, DigitsDataModule], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second, _ = two_reports
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli_main(["compare", str(first), str(second), "--out", str(foreign)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me" and sorted(p.name for p in foreign.iterdir()) == [
        "notes.txt"
    ]
    assert cli_main(["compare", str(first), str(second), "--out", str(first)]) == 2
    assert "is the report folder" in capsys.readouterr().err
    assert cli_main(["compare", str(first), "--out", str(tmp_path / "z")]) == 2


def test_intervals_labels_and_importance_from_the_reports_sections(
    two_reports: tuple[Path, Path, DigitsDataModule], tmp_path: Path
) -> None:
    """The calibration callback's ECE interval and the head-specialization registry's labels and importance, in the
    layouts those callbacks write into report.json's sections, come out per report."""
    folders = []
    for index, source in enumerate(two_reports[:2]):
        folder = tmp_path / f"r{index}"
        shutil.copytree(source, folder)
        report = json.loads((folder / "report.json").read_text())
        site = report["attention"]["sites"][0]["name"]
        report["sections"] = {
            "calibration": {
                "callback": "x",
                "results": {"metrics": {"ece": 0.1, "ece_ci_low": 0.05 + index, "ece_ci_high": 0.2 + index}},
            },
            "head_specialization": {
                "callback": "y",
                "registry": {
                    "layers": [
                        {
                            "site": site,
                            "heads": [
                                {
                                    "head": 0,
                                    "label": ["Broad head", "Previous-token head"][index],
                                    "importance": {"raw": 2.0 + index, "normalized": 0.5 * index},
                                },
                                {"head": 1, "label": "Broad head", "importance": {"raw": 1.0, "normalized": None}},
                            ],
                        }
                    ]
                },
            },
        }
        (folder / "report.json").write_text(json.dumps(report))
        folders.append(load_report(folder))
    comparison = compare_reports(folders)
    assert comparison["metrics"]["ece_ci_low"] == [0.05, 1.05] and comparison["metrics"]["ece_ci_high"] == [0.2, 1.2]
    head0, head1 = comparison["heads"][:2]
    assert head0["label"] == ["Broad head", "Previous-token head"] and head0["label_changed"]
    assert head0["importance"] == [0.0, 0.5] and head0["importance_raw"] == [2.0, 3.0]
    assert not head1["label_changed"] and head1["importance"] == [None, None]


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["compare", "--help"]) == 0
    assert "--out" in capsys.readouterr().out


def _without_hashes(source: Path, target: Path) -> Path:
    """A copy of a report as written before samples.csv had its input_sha256 column."""
    shutil.copytree(source, target)
    with (target / "samples.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    drop = rows[0].index("input_sha256")
    with (target / "samples.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([cell for i, cell in enumerate(row) if i != drop] for row in rows)
    return target


def test_reports_without_input_hashes(two_reports: tuple[Path, Path, DigitsDataModule], tmp_path: Path) -> None:
    """Older reports match by position only when their inputs hash equal; else the comparison stops."""
    first, second, _ = two_reports
    a = load_report(_without_hashes(first, tmp_path / "a"))
    same = load_report(_without_hashes(first, tmp_path / "same"))
    comparison = compare_reports([a, same])
    assert comparison["samples"]["matched"] == len(a.rows) and comparison["samples"]["changed"] == []
    b = load_report(_without_hashes(second, tmp_path / "b"))  # other batch sizes: another inputs hash
    with pytest.raises(CompareError, match="no per-sample input hashes"):
        compare_reports([a, b])
