"""ExplainabilityReport / build_report: outputs, schema, provenance, saliency, failure handling."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import jsonschema
import lightning.pytorch as pl
import pytest
import torch
from report_helpers import (
    A_FEATURES,
    DictDataset,
    OneFeatureModel,
    TinyClassifier,
    TinyData,
    make_samples,
    shared_report,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn import AttentionRecorder, ExplainabilityReport, build_report
from lightning_attn.report import ReportError, StreamHasher, hash_config, hash_state_dict, load_schema
from lightning_attn.report.explain import compute_saliency, default_forward


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return shared_report(str(tmp_path_factory.getbasetemp()))


def read_csv(path: Path) -> tuple[dict, list[str], list[list[str]]]:
    """(provenance, header, rows) of a report CSV: the CSV starts with its header, its provenance is the
    ``provenance.json`` beside it."""
    provenance = json.loads((path.parent / "provenance.json").read_text(encoding="utf-8"))
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return provenance, header, list(reader)


# -- outputs -------------------------------------------------------------------------------------------------
def test_outputs_exist_and_json_validates_against_packaged_schema(shared: dict) -> None:
    out = shared["dir"]
    for name in (
        "report.html",
        "report.json",
        "samples.csv",
        "per_head.csv",
        "classwise.csv",
        "batches.csv",
        "saliency.csv",
        "summary.md",
    ):
        assert (out / name).is_file(), name
    assert not (out / "INCOMPLETE").exists()
    assert sorted(p.name for p in (out / "figures").glob("*.png")), "no figures"
    report = json.loads((out / "report.json").read_text())
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(report, schema, cls=jsonschema.Draft202012Validator)
    assert report["schema_version"] == "1.0"
    # the schema is strict enough to catch a broken document
    broken = dict(report, provenance={**report["provenance"], "model_sha256": "not-a-hash"})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)
    # every listed file exists with the recorded hash
    import hashlib

    for name, entry in report["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"], name


def test_csv_rows_equal_samples_and_match_json(shared: dict) -> None:
    out, n = shared["dir"], shared["num_samples"]
    report = json.loads((out / "report.json").read_text())
    provenance, header, rows = read_csv(out / "samples.csv")
    assert len(rows) == n == report["dataset"]["num_samples"] == report["files"]["samples.csv"]["rows"]
    assert [int(r[0]) for r in rows] == list(range(n))
    assert provenance["report_sha256"] == report["provenance"]["report_sha256"]
    col = {name: i for i, name in enumerate(header)}
    for needed in (
        "predicted",
        "confidence",
        "target",
        "correct",
        "calibration_bin",
        "target_name",
        "predicted_name",
        "cross_ba/top_pairs",
        "encoder.layers.1.self_attn/top_pairs",
        "agreement/a<->b",
        "encoder.layers.0.self_attn/entropy_mean",
        "encoder.layers.0.self_attn/focused_head",
    ):
        assert needed in col, needed
    accuracy = sum(int(r[col["correct"]]) for r in rows) / n
    assert math.isclose(accuracy, report["dataset"]["accuracy"])
    for r in rows:
        confidence = float(r[col["confidence"]])
        assert int(r[col["correct"]]) == int(r[col["predicted"]] == r[col["target"]])
        assert int(r[col["calibration_bin"]]) == min(int(confidence * 15), 14)
        assert 0 <= float(r[col["encoder.layers.0.self_attn/entropy_mean"]]) <= 1
        assert -1 <= float(r[col["agreement/a<->b"]]) <= 1
        pairs = r[col["cross_ba/top_pairs"]].split(";")
        assert len(pairs) == 3 and all(">" in p and ":" in p for p in pairs)
        weights = [float(p.split(":")[1]) for p in pairs]
        assert weights == sorted(weights, reverse=True)
    # per-head CSV: one row per (site, head); class-wise: one per class
    _, _head_header, head_rows = read_csv(out / "per_head.csv")
    assert len(head_rows) == sum(s["num_heads"] for s in report["attention"]["sites"]) == 4 * 2
    _, _, class_rows = read_csv(out / "classwise.csv")
    assert [int(r[2]) for r in class_rows] == [c["support"] for c in report["classwise"]]
    assert sum(int(r[2]) for r in class_rows) == n
    _, _, batch_rows = read_csv(out / "batches.csv")
    assert [int(r[1]) for r in batch_rows] == [16, 16, 8]


def test_statistics_are_consistent(shared: dict) -> None:
    report = json.loads((shared["dir"] / "report.json").read_text())
    d = report["dataset"]
    group = report["correct_vs_incorrect"]
    assert group["confidence"]["correct"]["n"] == d["num_correct"]
    assert group["confidence"]["incorrect"]["n"] == d["num_incorrect"]
    assert set(group) >= {
        "confidence",
        "margin",
        "output_entropy",
        "nll",
        "brier",
        "agreement/a<->b",
        "cross_ab/entropy_mean",
        "cross_ab/focused_entropy",
    }
    bins = report["calibration"]["bins"]
    assert sum(b["count"] for b in bins) == d["num_samples"]
    ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / d["num_samples"]
    assert math.isclose(ece, d["ece"], rel_tol=1e-9)
    for site in report["attention"]["sites"]:
        assert math.isclose(sum(site["focused_share"]), 1.0)
    assert [c["name"] for c in report["classwise"]] == ["low", "mid", "high"]
    assert report["attention"]["modality_pairs"]["a<->b"]["sites"] == ["cross_ab", "cross_ba"]


def test_sections_of_other_callbacks_and_provenance_everywhere(shared: dict) -> None:
    out = shared["dir"]
    report = json.loads((out / "report.json").read_text())
    sections = report["sections"]
    assert sections["calibration"]["results"]["metrics"]["ece"] == 0.125
    assert sections["calibration"]["results"]["bins"]["count"] == [1.0, 2.0, None]  # NaN -> null
    assert sections["head_specialization"]["registry"]["stage"] == "test"
    html = (out / "report.html").read_text()
    assert 'id="calibration"' in html and "previous-token" in html
    sha = report["provenance"]["report_sha256"]
    assert sha in html and sha in (out / "summary.md").read_text()
    for path in out.glob("*.csv"):
        assert read_csv(path)[0]["report_sha256"] == sha
    from PIL import Image

    png = next((out / "figures").glob("*.png"))
    assert json.loads(Image.open(png).text["lightning_attn_provenance"])["report_sha256"] == sha
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # nothing fetched


# -- saliency --------------------------------------------------------------------------------------------------
def test_shared_report_saliency(shared: dict) -> None:
    sal = json.loads((shared["dir"] / "report.json").read_text())["saliency"]
    assert sal["num_probes"] == 3 and [p["sample"] for p in sal["probes"]] == [0, 1, 2]
    probe = sal["probes"][0]
    assert probe["inputs"]["a"]["feature_names"] == [f"a{i}" for i in range(A_FEATURES)]
    assert math.isclose(sum(probe["inputs"]["a"]["share"]), 1.0, rel_tol=1e-6)
    # rollout over the two self-attention layers, relevance of every token; head relevance of every site
    assert probe["rollout"]["sites"] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert len(probe["rollout"]["mean_row"]) == 6
    assert set(probe["head_relevance"]) == {
        "encoder.layers.0.self_attn",
        "encoder.layers.1.self_attn",
        "cross_ab",
        "cross_ba",
    }
    assert all(v >= 0 for values in probe["head_relevance"].values() for v in values)


def test_saliency_goes_to_the_only_feature_the_model_reads(tmp_path: Path) -> None:
    """Output depends on feature 2 only: gradient x input puts all saliency there, through the real test loop
    (inference mode) on a plain nn.Module."""
    torch.manual_seed(0)
    model = OneFeatureModel(num_features=5, feature=2)
    x = torch.randn(12, 7, 5) + 2.0
    y = torch.randint(0, 2, (12,))
    names = ["f0", "f1", "f2", "f3", "f4"]
    out = build_report(
        model,
        DataLoader(TensorDataset(x, y), batch_size=5),
        tmp_path / "one",
        accelerator="cpu",
        progress=False,
        feature_names=names,
        probe_samples=6,
        figures=False,
    )
    sal = json.loads((out / "report.json").read_text())["saliency"]
    assert sal["num_probes"] == 6 and [p["sample"] for p in sal["probes"]] == list(range(6))  # across batches
    for probe in sal["probes"]:
        entry = probe["inputs"]["input0"]
        assert entry["share"] == [0.0, 0.0, 1.0, 0.0, 0.0]
        assert entry["top"][0][0] == "f2"
        assert entry["abs"][2] > 0
    assert sal["aggregate"]["input0"]["mean_share"] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert list(sal["head_relevance"]) == ["attn"]


def test_compute_saliency_under_inference_mode_pairs_grads_by_site() -> None:
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    batch = {k: torch.stack([s[k] for s in make_samples(3, 5)]) for k in ("a", "b", "label")}
    with torch.inference_mode():
        frozen = {k: v.clone() for k, v in batch.items()}  # inference tensors, as in the test loop
        result = compute_saliency(model, frozen, default_forward, explain=torch.tensor([0, 1, 2]))
    assert result["sites_without_gradient"] == []
    # an independent check: d score / d input by plain autograd, outside any inference mode
    a = batch["a"].clone().requires_grad_(True)
    logits = model(a, batch["b"])
    (grad,) = torch.autograd.grad(logits.gather(1, torch.tensor([[0], [1], [2]])).sum(), a)
    expected = (a * grad).detach().abs().sum(1)
    torch.testing.assert_close(result["inputs"]["a"]["abs"], expected, rtol=1e-4, atol=1e-6)
    for p in model.parameters():
        assert p.grad is None


# -- provenance --------------------------------------------------------------------------------------------------
def test_hash_state_dict_changes_with_one_weight_and_is_order_independent() -> None:
    torch.manual_seed(0)
    model = TinyClassifier()
    state = model.state_dict()
    first = hash_state_dict(state)
    assert first == hash_state_dict(dict(reversed(list(state.items()))))
    assert first == hash_state_dict({k: v.clone() for k, v in state.items()})
    changed = {k: v.clone() for k, v in state.items()}
    changed["head.weight"][0, 0] += 1e-6
    assert hash_state_dict(changed) != first
    assert hash_state_dict({"w": torch.ones(2, dtype=torch.bfloat16)}) != hash_state_dict({"w": torch.ones(2)})
    assert (
        hash_config({"a": 1, "b": [1, 2]}) == hash_config({"b": [1, 2], "a": 1}) != hash_config({"a": 2, "b": [1, 2]})
    )
    h1, h2 = StreamHasher(), StreamHasher()
    for h in (h1, h2):
        h.update({"x": torch.arange(4), "y": torch.zeros(2)})
    assert h1.hexdigest() == h2.hexdigest()
    h2.update({"x": torch.arange(4)})
    assert h1.hexdigest() != h2.hexdigest()


def _quick(model: nn.Module, out: Path, **kwargs: object) -> dict:
    path = build_report(
        model,
        TinyData(num_test=24, batch_size=8).test_dataloader(),
        out,
        accelerator="cpu",
        progress=False,
        figures=False,
        probe_samples=1,
        **kwargs,
    )
    return json.loads((path / "report.json").read_text())


def test_provenance_identical_for_identical_runs_and_changes_with_one_weight(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TinyClassifier()
    first = _quick(model, tmp_path / "r1")
    second = _quick(model, tmp_path / "r2")
    keys = ("report_sha256", "model_sha256", "inputs_sha256", "config_sha256")
    assert {k: first["provenance"][k] for k in keys} == {k: second["provenance"][k] for k in keys}
    assert first["provenance"]["model_sha256"] == hash_state_dict(model.state_dict())
    assert (tmp_path / "r1" / "samples.csv").read_text().splitlines()[1:] == (
        tmp_path / "r2" / "samples.csv"
    ).read_text().splitlines()[1:]
    with torch.no_grad():
        model.head.bias[0] += 1e-3
    third = _quick(model, tmp_path / "r3")
    assert third["provenance"]["model_sha256"] != first["provenance"]["model_sha256"]
    assert third["provenance"]["report_sha256"] != first["provenance"]["report_sha256"]
    assert third["provenance"]["inputs_sha256"] == first["provenance"]["inputs_sha256"]
    assert third["provenance"]["config_sha256"] == first["provenance"]["config_sha256"]


class CountingRecorderCallback(pl.Callback):
    """Another callback with its own recorder open from batch start to batch end (as AttentionLogger does)."""

    def __init__(self) -> None:
        self.captures = 0
        self.recorder: AttentionRecorder | None = None

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.recorder = AttentionRecorder(pl_module, keep=False, on_capture=self._count)
        self.recorder.__enter__()

    def _count(self, capture: object) -> None:
        self.captures += 1

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.recorder.__exit__(None, None, None)


@pytest.mark.parametrize("variant", ["logits_returned", "forward_hook", "forward_fn_recompute"])
def test_logits_paths_give_the_same_rows_and_never_feed_other_recorders(tmp_path: Path, variant: str) -> None:
    """The step returns logits / returns only the loss (logits read from the module's forward inside the step) /
    a forward_fn is given (one extra pass): identical reports; another callback's open recorder sees each test
    forward exactly once (the report's own passes, saliency included, are hidden from it)."""
    torch.manual_seed(1)
    reference_model = TinyClassifier()
    model = TinyClassifier(step_returns_logits=(variant == "logits_returned"))
    model.load_state_dict(reference_model.state_dict())
    other = CountingRecorderCallback()
    kwargs: dict = {"callbacks": [other]}
    if variant == "forward_fn_recompute":
        kwargs["forward_fn"] = lambda module, batch: module(batch["a"], batch["b"])
    report = _quick(model, tmp_path / variant, **kwargs)
    assert other.captures == 3 * 4  # 3 batches x 4 sites: only the steps' own forwards
    assert report["saliency"]["num_probes"] == 1
    reference = _quick(reference_model, tmp_path / "reference")
    if variant != "forward_fn_recompute":  # a forward_fn is part of the configuration, hence of its hash
        assert report["provenance"]["report_sha256"] == reference["provenance"]["report_sha256"]
    rows, ref_rows = (read_csv(tmp_path / name / "samples.csv")[2] for name in (variant, "reference"))
    assert [r[:5] for r in rows] == [r[:5] for r in ref_rows]  # sample, batch, target, predicted, correct
    assert [float(r[5]) for r in rows] == pytest.approx([float(r[5]) for r in ref_rows], abs=1e-6)  # confidence


# -- failures ------------------------------------------------------------------------------------------------------
def test_dataloader_without_targets_fails_clearly_and_leaves_nothing_final(tmp_path: Path) -> None:
    data = TinyData(num_test=16, batch_size=8, with_targets=False).test_dataloader()
    with pytest.raises(ReportError, match="no targets"):
        build_report(TinyClassifier(), data, tmp_path / "final", accelerator="cpu", progress=False, figures=False)
    assert not (tmp_path / "final").exists()
    partial = list(tmp_path.glob(".final.incomplete-*"))
    assert len(partial) == 1 and "INCOMPLETE" in (partial[0] / "INCOMPLETE").read_text()
    assert "failed" in (partial[0] / "INCOMPLETE").read_text()


def test_failure_keeps_a_previous_complete_report(tmp_path: Path) -> None:
    x = torch.randn(8, 4, 5)
    y = torch.randint(0, 2, (8,))
    out = build_report(
        OneFeatureModel(),
        DataLoader(TensorDataset(x, y), batch_size=4),
        tmp_path / "r",
        accelerator="cpu",
        progress=False,
        figures=False,
        probe_samples=0,
    )
    before = (out / "report.json").read_text()
    with pytest.raises(ReportError, match="targets"):
        build_report(
            OneFeatureModel(),
            DataLoader(TensorDataset(x, x), batch_size=4),
            tmp_path / "r",
            accelerator="cpu",
            progress=False,
            figures=False,
        )
    assert (out / "report.json").read_text() == before and not (out / "INCOMPLETE").exists()


def test_validation_stage_during_fit(tmp_path: Path) -> None:
    pl.seed_everything(0)
    report = ExplainabilityReport(stages=["validate"], save_dir=str(tmp_path), figures=False, probe_samples=1)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        callbacks=[report],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(TinyClassifier(), datamodule=TinyData(num_train=16, num_test=20, batch_size=8))
    out = tmp_path / "report" / "val_epoch0"
    data = json.loads((out / "report.json").read_text())
    assert data["stage"] == "validate" and data["dataset"]["num_samples"] == 20
    assert report.results["val"]["directory"] == str(out)
    assert "report/val/accuracy" in trainer.callback_metrics


def test_real_calibration_and_head_specialization_callbacks_get_sections(tmp_path: Path) -> None:
    from lightning_attn import CalibrationMonitor, HeadSpecializationTracker

    calibration = CalibrationMonitor(stages=["test"], target_key="label", plot=False, save_dir=str(tmp_path / "cal"))
    heads = HeadSpecializationTracker(stages=["test"], log_figures=False, save_dir=str(tmp_path / "heads"))
    path = build_report(
        TinyClassifier(),
        TinyData(num_test=24, batch_size=8).test_dataloader(),
        tmp_path / "r",
        accelerator="cpu",
        progress=False,
        figures=False,
        probe_samples=0,
        callbacks=[calibration, heads],
    )
    report = json.loads((path / "report.json").read_text())
    assert "error" not in report["sections"]["calibration"], report["sections"]["calibration"].get("error")
    assert report["sections"]["calibration"]["results"]["metrics"]["ece"] == pytest.approx(
        report["dataset"]["ece"], abs=1e-5
    )
    assert "registry" in report["sections"]["head_specialization"], report["sections"]["head_specialization"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="saliency_target"):
        ExplainabilityReport(saliency_target="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown stage"):
        ExplainabilityReport(stages=["fit"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="two sites"):
        ExplainabilityReport(modality_pairs={"x": ("a",)})  # type: ignore[dict-item]


def test_pytorch_lightning_modules_run_under_their_own_trainer(tmp_path: Path) -> None:
    """A ``pytorch_lightning`` LightningModule keeps its own step, a ``pytorch_lightning`` datamodule feeds a plain
    model (wrapped in that package's LightningModule); mixing the two packages is a clear error."""
    standalone = pytest.importorskip("pytorch_lightning")
    data = DataLoader(TensorDataset(torch.randn(8, 5, 8), torch.randint(0, 3, (8,))), batch_size=4)

    class StandaloneClassifier(standalone.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)
            self.steps = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attention(x, x, x)[0].mean(1))

        def test_step(self, batch: tuple, batch_idx: int) -> dict:
            self.steps += 1
            return {"logits": self(batch[0]), "target": batch[1]}

    class StandaloneData(standalone.LightningDataModule):
        def test_dataloader(self) -> DataLoader:
            return data

    model = StandaloneClassifier()
    out = build_report(model, data, tmp_path / "own_step", accelerator="cpu", progress=False, figures=False)
    assert model.steps == 2 and (out / "report.json").is_file()
    plain = nn.Sequential(nn.Flatten(), nn.Linear(40, 3))
    out = build_report(plain, StandaloneData(), tmp_path / "wrapped", accelerator="cpu", progress=False, figures=False)
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["dataset"]["num_samples"] == 8
    with pytest.raises(ReportError, match="different Lightning packages"):
        build_report(model, TinyData(), tmp_path / "mixed", progress=False)


def test_dict_dataset_helper_is_deterministic() -> None:
    a, b = make_samples(3, 0), make_samples(3, 0)
    assert all(torch.equal(x["a"], y["a"]) for x, y in zip(a, b, strict=False))
    assert len(DictDataset(a)) == 3


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_per_sample_attention_reductions_match_full_maps(chunk_size: int | None) -> None:
    """Streamed per-sample entropy and top pairs (query chunks) equal those computed from the whole maps."""
    from lightning_attn.functional import normalized_entropy, top_k_pairs
    from lightning_attn.report.explain import BatchAttention

    torch.manual_seed(0)
    model = TinyClassifier().eval()
    batch = {k: torch.stack([s[k] for s in make_samples(5, 3)]) for k in ("a", "b")}
    with torch.no_grad(), AttentionRecorder(model) as full:
        model(**batch)
    sink = BatchAttention(chunk_size, ["encoder.layers.*", "cross_ba"], ["cross_ab"], top_k=4)
    with torch.no_grad(), AttentionRecorder(model, keep=False, on_capture=sink):
        model(**batch)
    assert list(sink.sites) == list(full.maps) and sink.pair_site_names() == [
        "encoder.layers.0.self_attn",
        "encoder.layers.1.self_attn",
        "cross_ba",
    ]
    for site, maps in full.maps.items():
        torch.testing.assert_close(sink.sites[site].entropy, normalized_entropy(maps).mean(-1), rtol=1e-5, atol=1e-6)
        if site in sink.pair_site_names():
            expected = [top_k_pairs(m, 4) for m in maps.mean(1)]
            got = sink.sites[site].top_pairs()
            assert [[(q, k) for q, k, _ in s] for s in got] == [[(q, k) for q, k, _ in s] for s in expected]
            assert [w for s in got for *_, w in s] == pytest.approx([w for s in expected for *_, w in s])
    assert sink.sites["cross_ab"].head_mean is not None and sink.sites["cross_ab"].top_values is None
