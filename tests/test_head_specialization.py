"""HeadSpecializationTracker: planted heads are labelled, type scores follow TransformerLens' formula by hand,
feature correlations equal numpy's, the registry round-trips and validates, a resumed run continues the history.

The planted model is in ``planted_heads.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from planted_heads import (
    EXPECTED_LABELS,
    FEATURES,
    make_loader,
    make_module,
    trainer_kwargs,
)
from torch import nn

from lightning_attn import HeadSpecializationTracker
from lightning_attn.functional import duplicate_token_pattern, induction_pattern
from lightning_attn.metrics.heads import (
    BatchContext,
    FeatureCorrelation,
    HeadSpecializationMetrics,
    HeadTypeScores,
    analyze_heads,
    pearson_from_sums,
    registry_schema,
    token_patterns,
)

# -- head-type scores by hand --------------------------------------------------------------------------------


def tl_patterns_by_hand(tokens: list[int]) -> dict[str, np.ndarray]:
    """TransformerLens' detection patterns written out with loops from their definitions."""
    n = len(tokens)
    previous, duplicate, induction = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            previous[i, j] = float(j == i - 1)
            duplicate[i, j] = float(j < i and tokens[i] == tokens[j])
            induction[i, j] = float(1 <= j <= i and tokens[i] == tokens[j - 1])
    return {"previous_token": previous, "duplicate_token": duplicate, "induction": induction}


def test_token_patterns_on_a_hand_made_sequence() -> None:
    tokens = torch.tensor([[7, 8, 7, 8]])
    duplicate, induction = token_patterns(tokens)
    assert {tuple(p) for p in duplicate[0].nonzero().tolist()} == {(2, 0), (3, 1)}
    assert {tuple(p) for p in induction[0].nonzero().tolist()} == {(2, 1), (3, 2)}
    # the same as the full-map functional versions, chunk by chunk, and as the loops
    tokens = torch.randint(0, 3, (3, 11), generator=torch.Generator().manual_seed(0))
    for offset in (0, 4, 8):
        dup, ind = token_patterns(tokens, offset, 4)
        assert torch.equal(dup.float(), duplicate_token_pattern(tokens)[:, offset : offset + 4])
        assert torch.equal(ind.float(), induction_pattern(tokens)[:, offset : offset + 4])
    for b in range(3):
        hand = tl_patterns_by_hand(tokens[b].tolist())
        dup, ind = token_patterns(tokens)
        assert np.array_equal(dup[b].numpy(), hand["duplicate_token"].astype(bool))
        assert np.array_equal(ind[b].numpy(), hand["induction"].astype(bool))


@pytest.mark.parametrize("exclude_bos,exclude_current", [(False, False), (True, False), (False, True), (True, True)])
def test_type_scores_equal_the_transformer_lens_formula_by_hand(exclude_bos: bool, exclude_current: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    tokens = torch.tensor([[1, 2, 3, 1, 2, 3], [4, 4, 1, 4, 1, 2]])
    scores = torch.randn(2, 3, 6, 6, generator=generator).masked_fill(
        torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf")
    )
    probs = scores.softmax(-1)
    metric = HeadTypeScores(exclude_bos=exclude_bos, exclude_current_token=exclude_current)
    for b in range(2):  # one sample at a time, in two query chunks: the sums must add up
        metric.update("site", probs[b : b + 1, :, :4], 0, tokens[b : b + 1])
        metric.update("site", probs[b : b + 1, :, 4:], 4, tokens[b : b + 1])
    got = metric.compute()["site"]
    for t, name in enumerate(("previous_token", "duplicate_token", "induction")):
        for h in range(3):
            numerator = denominator = 0.0
            for b in range(2):
                attention = probs[b, h].double().numpy().copy()
                if exclude_bos:
                    attention[:, 0] = 0
                if exclude_current:
                    np.fill_diagonal(attention, 0)
                pattern = tl_patterns_by_hand(tokens[b].tolist())[name]
                numerator += float((attention * pattern).sum())
                denominator += float(attention.sum())
            assert got[t, h].item() == pytest.approx(numerator / denominator, abs=1e-6)


def test_type_scores_of_pure_patterns_and_without_tokens() -> None:
    tokens = torch.tensor([[5, 6, 5, 6, 5, 6]])
    hand = tl_patterns_by_hand(tokens[0].tolist())
    rows = []
    for name in ("previous_token", "duplicate_token", "induction"):
        pattern = torch.tensor(hand[name], dtype=torch.float32)
        for i in range(6):
            if pattern[i].sum() == 0:  # a row without a target attends to itself
                pattern[i, i] = 1
        rows.append(pattern / pattern.sum(-1, keepdim=True))
    probs = torch.stack(rows)[None]  # [1, 3 heads, 6, 6]
    metric = HeadTypeScores()
    metric.update("s", probs, 0, tokens)
    got = metric.compute()["s"]
    # head 0 is the previous-token pattern: 5 of 6 rows have a previous token
    assert got[0, 0].item() == pytest.approx(5 / 6)
    # duplicate head: rows 2..5 have earlier duplicates (4 of 6 rows); induction head: rows 2..5 too
    assert got[1, 1].item() == pytest.approx(4 / 6)
    assert got[2, 2].item() == pytest.approx(4 / 6)
    no_tokens = HeadTypeScores()
    no_tokens.update("s", probs)
    assert torch.isnan(no_tokens.compute()["s"][1:]).all() and not torch.isnan(no_tokens.compute()["s"][0]).any()


# -- feature correlation ------------------------------------------------------------------------------------


def test_feature_correlation_equals_numpy_and_handles_nan_and_constants() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=generator)
    y = 0.7 * x[:, 0] + 0.3 * torch.randn(40, generator=generator)
    y[5] = float("nan")
    x[:, 2] = 0.25  # a constant head: undefined
    metric = FeatureCorrelation(["f"])
    for start in range(0, 40, 16):
        metric.update("s", "f", x[start : start + 16], y[start : start + 16])
    r = metric.compute()["s"][0]
    keep = ~torch.isnan(y)
    for h in range(2):
        assert r[h].item() == pytest.approx(np.corrcoef(x[keep, h].numpy(), y[keep].numpy())[0, 1], abs=1e-9)
    assert math.isnan(r[2].item())
    assert torch.isnan(pearson_from_sums(torch.zeros(6, 1, dtype=torch.float64))).all()


def test_per_token_feature_pairs_received_attention_with_token_values() -> None:
    generator = torch.Generator().manual_seed(1)
    batch, length = 6, 5
    values = torch.rand(batch, length, generator=generator)
    # head 0 gives each key attention proportional to its value; head 1 is uniform (constant: undefined)
    head0 = (values / values.sum(-1, keepdim=True))[:, None, :].expand(batch, length, length)
    probs = torch.stack([head0, torch.full((batch, length, length), 1 / length)], 1)
    metrics = HeadSpecializationMetrics(["v"], chunk_size=2)
    metrics.update(probs, BatchContext(features={"v": values}), site="s")
    r = metrics.correlation.compute()["s"][0]
    expected = np.corrcoef(head0[:, 0].flatten().numpy(), values.flatten().numpy())[0, 1]
    assert r[0].item() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(r[1].item())


def causal_probs(batch: int, heads: int, length: int, seed: int) -> torch.Tensor:
    scores = torch.randn(batch, heads, length, length, generator=torch.Generator().manual_seed(seed))
    return scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


def test_row_statistics_equal_the_functional_definitions_in_chunks() -> None:
    from lightning_attn.functional import diagonal_mass, local_window_mass, mean_attention_distance, normalized_entropy

    probs = causal_probs(3, 2, 7, seed=4)
    exclude = torch.zeros(3, 7, dtype=torch.bool)
    exclude[0, 2] = True  # a per-sample special token, plus the last position for everyone
    metrics = HeadSpecializationMetrics(chunk_size=3, local_window=1, confidence_exclude_positions=[-1])
    metrics.update(probs, BatchContext(confidence_exclude=exclude), site="s")
    entry = metrics.compute()
    stats = entry["statistics"]["s"]
    valid = probs > 0  # causal: the keys a row may attend
    excluded = exclude[:, None, None, :] | (torch.arange(7) == 6)
    expected = {
        "entropy": normalized_entropy(probs, valid),
        "confidence": probs.masked_fill(excluded, 0).amax(-1),
        "distance": mean_attention_distance(probs),
        "first_token": probs[..., 0],
        "self": diagonal_mass(probs, 0),
        "previous": diagonal_mass(probs, -1),
        "next": diagonal_mass(probs, 1),
        "local": local_window_mass(probs, 1),
    }
    for name, values in expected.items():
        assert stats[name] == pytest.approx(values.mean((0, 2)).tolist(), abs=1e-6), name
    assert entry["rows"]["s"] == [21.0, 21.0]


@pytest.mark.parametrize("summary", ["max_weight", "entropy", "mass"])
def test_sample_summaries_by_hand_with_padding(summary: str) -> None:
    from lightning_attn.functional import normalized_entropy

    batch, length = 12, 5
    probs = causal_probs(batch, 2, length, seed=5)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[::3, -2:] = False  # padded samples: their last two query rows do not count
    token_mask = torch.zeros(batch, length, dtype=torch.bool)
    token_mask[:, 0] = True
    token_mask[1::2, 1] = True
    y = torch.randn(batch, generator=torch.Generator().manual_seed(6))
    metrics = HeadSpecializationMetrics(["f"], summary=summary, chunk_size=2, probe_samples=0)
    context = BatchContext(valid=valid, features={"f": y}, masks={"f": token_mask} if summary == "mass" else {})
    metrics.update(probs, context, site="s")
    r = metrics.compute()["correlations"]["s"]["f"]
    per_row = {
        "max_weight": probs.amax(-1),
        "entropy": normalized_entropy(probs, probs > 0),
        "mass": (probs * token_mask[:, None, None, :]).sum(-1),
    }[summary]
    for h in range(2):
        x = [float(per_row[b, h][valid[b]].mean()) for b in range(batch)]
        assert r[h] == pytest.approx(np.corrcoef(x, y.numpy())[0, 1], abs=1e-6)


def test_labels_follow_hsi_types_and_signs() -> None:
    entry = {
        "sites": [{"name": "s", "kind": "self", "num_heads": 4}],
        "statistics": {"s": {"entropy": [0.2, 0.95, 0.3, 0.3], "first_token": [0.1, 0.05, 0.9, 0.1]}},
        "type_scores": {
            "s": {
                "previous_token": [0.9, 0.1, 0.0, 0.1],
                "duplicate_token": [math.nan] * 4,
                "induction": [math.nan] * 4,
            }
        },
        "correlations": {"s": {"ttc": [-0.1, 0.2, 0.5, math.nan], "new_feature": [0.05, -0.1, 0.1, -0.45]}},
    }
    thresholds = {"induction": 0.5, "duplicate_token": 0.5, "previous_token": 0.5, "sink": 0.5, "broad": 0.8}
    from lightning_attn.metrics.heads import DEFAULT_FEATURE_LABELS

    analyze_heads(entry, hsi_threshold=0.3, thresholds=thresholds, feature_labels=DEFAULT_FEATURE_LABELS)
    assert entry["labels"]["s"] == ["Previous-token head", "Broad head", "Safety Head (inverted)", "New Feature Head"]
    assert entry["hsi"]["s"] == pytest.approx([0.1, 0.2, 0.5, 0.45])
    assert entry["primary_feature"]["s"] == ["ttc", "ttc", "ttc", "new_feature"]
    assert entry["types"]["s"][2] == ["sink"]  # the feature label wins, the type is still listed


# -- the planted model, end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("planted")
    plain = HeadSpecializationTracker(
        features=FEATURES,
        save_dir=str(root / "out"),
        logged_scores=("entropy", "hsi", "previous_token"),
        log_per_head=True,
    )
    masked = HeadSpecializationTracker(
        features={"ttc": "ttc"},
        feature_masks={"ttc": "agent_mask"},
        chunk_size=5,
        probe_samples=0,
        log_figures=False,
        export_registry=False,
        logged_scores=(),
        name="heads_masked",
    )
    module = make_module()
    trainer = pl.Trainer(callbacks=[plain, masked], **trainer_kwargs(root))
    metrics = trainer.validate(module, make_loader(), verbose=False)[0]
    return {"plain": plain, "masked": masked, "metrics": metrics, "root": root}


def test_planted_heads_are_labelled(planted_run: dict[str, Any]) -> None:
    for name in ("plain", "masked"):
        record = planted_run[name].history_for("val")[-1]
        sites = [s["name"] for s in record["sites"]]
        assert sites == ["model.layers.0", "model.layers.1"]
        for site, expected in zip(sites, EXPECTED_LABELS, strict=False):
            assert record["labels"][site] == expected, (name, site, record["hsi"][site], record["type_scores"][site])
    record = planted_run["plain"].history_for("val")[-1]
    first, second = "model.layers.0", "model.layers.1"
    assert record["primary_feature"][first][3] == "ttc" and record["correlation"][first][3] < -0.9
    assert record["hsi"][first][3] > 0.9
    assert max(record["hsi"][first][h] for h in (4, 5)) < 0.3
    assert record["type_scores"][first]["previous_token"][0] == pytest.approx(15 / 16)  # row 0 has no previous token
    assert record["statistics"][first]["first_token"][1] == pytest.approx(1.0)
    assert record["statistics"][first]["entropy"][2] == pytest.approx(1.0, abs=1e-6)
    assert record["statistics"][first]["previous"][0] == pytest.approx(15 / 16)
    assert record["statistics"][first]["confidence"][0] == pytest.approx(1.0)
    assert record["statistics"][first]["local"][0] == pytest.approx(1.0)
    assert record["statistics"][first]["distance"][0] == pytest.approx(15 / 16)
    assert record["statistics"][first]["self"][1] == pytest.approx(1 / 16)
    # the constant heads have no defined correlation (undefined, not 0)
    assert record["hsi"][first][0] is None and record["primary_feature"][first][0] is None
    # a duplicate pair across layers is the one near-duplicate cluster
    assert record["clusters"] == [[f"{first}/h0", f"{second}/h0"]]
    masked = planted_run["masked"].history_for("val")[-1]
    assert masked["correlation"][first][3] < -0.95  # mass on token 1 tracks ttc more directly than the max weight
    logged = planted_run["metrics"]
    assert logged[f"heads/val/{first}/h0/previous_token"] == pytest.approx(15 / 16)
    assert logged[f"heads/val/{first}/h3/hsi"] > 0.9
    assert logged["heads/val/specialized"] == 1.0
    assert logged["heads/val/general"] == 5.0


def test_registry_json_round_trips_and_validates(planted_run: dict[str, Any], tmp_path: Path) -> None:
    tracker: HeadSpecializationTracker = planted_run["plain"]
    out = planted_run["root"] / "out" / "heads" / "val"
    path = out / "head_functions_epoch0_step0.json"
    written = json.loads(path.read_text())
    registry = tracker.registry("val")
    assert written == registry
    jsonschema.validate(written, registry_schema())
    again = json.loads(tracker.save_registry(tmp_path / "copy.json").read_text())
    assert again == registry
    heads = {head["id"]: head for layer in written["layers"] for head in layer["heads"]}
    safety = heads["model.layers.0/h3"]
    assert (safety["label"], safety["primary_feature"], safety["specialization"]) == ("Safety Head", "ttc", "strong")
    assert safety["description"] == "Attends to low-TTC (collision threats)"
    assert heads["model.layers.0/h0"]["redundant_with"] == ["model.layers.1/h0"]
    assert heads["model.layers.1/h1"]["types"][0] == "induction"
    assert written["features"]["ttc"] == {
        "label": "Safety Head",
        "description": "Attends to low-TTC (collision threats)",
        "expected_sign": -1,
    }
    # figures and the table went to disk (no dashboard logger)
    names = {p.name.split("_epoch")[0] for p in out.glob("*.png")}
    assert names == {"hsi", "feature_correlation", "type_scores", "redundancy"}  # one epoch: no evolution, timeline
    assert (out / "registry_epoch0_step0.csv").exists()


def test_resume_continues_history_without_gap_or_duplicate(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_epochs: int, ckpt_path: str | None) -> HeadSpecializationTracker:
        tracker = HeadSpecializationTracker(
            features=FEATURES, probe_samples=2, log_figures=False, export_registry=False, logged_scores=()
        )
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1)
        trainer = pl.Trainer(
            callbacks=[tracker, checkpoint],
            max_epochs=max_epochs,
            limit_train_batches=2,
            limit_val_batches=2,
            **trainer_kwargs(tmp_path, enable_checkpointing=True),
        )
        trainer.fit(make_module(), make_loader(64), make_loader(64), ckpt_path=ckpt_path)
        return tracker

    first = run(2, None)
    assert [r["epoch"] for r in first.history_for("val")] == [0, 1]
    second = run(4, str(tmp_path / "ckpt" / "last.ckpt"))
    assert [r["epoch"] for r in second.history_for("val")] == [0, 1, 2, 3]
    assert [r["global_step"] for r in second.history_for("val")] == [2, 4, 6, 8]
    assert json.dumps(second.history_for("val")[:2], default=str) == json.dumps(first.history_for("val"), default=str)
    # the evolution figure spans the whole history
    figure = second.figures("val")["evolution"]
    assert len(figure.axes) >= 2


def test_every_n_epochs_test_stage_dataloaders_and_tensorboard(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = HeadSpecializationTracker(
        stages=("validate", "test"), every_n_epochs=2, probe_samples=2, logged_scores=()
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(
        callbacks=[tracker],
        max_epochs=3,
        limit_train_batches=1,
        limit_val_batches=1,
        limit_test_batches=1,
        **trainer_kwargs(tmp_path, logger=logger),
    )
    module = make_module()
    trainer.fit(module, make_loader(64), make_loader(64))
    trainer.test(module, make_loader(64), verbose=False)
    assert [r["epoch"] for r in tracker.history_for("val")] == [0, 2]
    test_record = tracker.history_for("test")[-1]
    assert test_record["labels"]["model.layers.0"][:3] == EXPECTED_LABELS[0][:3]
    assert tracker.registry("test")["stage"] == "test"
    with pytest.raises(LookupError):
        tracker.registry("val_dl1")
    # figures went to TensorBoard (rendered once, as images); without features: no HSI figures
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert {"heads/val/type_scores", "heads/val/redundancy", "heads/val/evolution", "heads/test/type_scores"} <= set(
        events.Tags()["images"]
    )
    assert not any("hsi" in tag for tag in events.Tags()["images"])
    # a second validation dataloader has its own record; the probe (redundancy) is dataloader 0's only
    # (a fresh Trainer: after fit the epoch index is 3, which every_n_epochs=2 skips)
    trainer = pl.Trainer(callbacks=[tracker], limit_val_batches=1, **trainer_kwargs(tmp_path))
    trainer.validate(module, [make_loader(64), make_loader(64, seed=2)], verbose=False)
    assert [r["epoch"] for r in tracker.history_for("val")] == [2, 0]  # epoch 0 re-evaluated: replaced, not duplicated
    assert tracker.history_for("val")[-1]["clusters"] and not tracker.history_for("val_dl1")[-1]["clusters"]
    assert tracker.history_for("val_dl1")[-1]["labels"]["model.layers.0"][:3] == EXPECTED_LABELS[0][:3]


def test_cli_signature_is_typed_and_documented() -> None:
    import inspect

    from jsonargparse import ArgumentParser

    signature = inspect.signature(HeadSpecializationTracker.__init__)
    doc = HeadSpecializationTracker.__doc__ or ""
    for name, parameter in list(signature.parameters.items())[1:]:
        assert parameter.annotation is not inspect.Parameter.empty, name
        assert f"        {name}:" in doc, name
        assert not isinstance(parameter.default, (dict, list, nn.Module)), name
    parser = ArgumentParser()
    parser.add_class_arguments(HeadSpecializationTracker, "tracker")
    config = parser.parse_args(
        [
            "--tracker.features",
            '{"ttc": "ttc", "distance": "meta.dist"}',
            "--tracker.feature_labels",
            '{"speed": ["Speed Head", "Tracks speed", 1]}',
            "--tracker.stages",
            '["validate", "test"]',
            "--tracker.hsi_threshold",
            "0.4",
        ]
    )
    tracker = (parser.instantiate if hasattr(parser, "instantiate") else parser.instantiate_classes)(config).tracker
    assert isinstance(tracker, HeadSpecializationTracker)
    assert tracker.features == {"ttc": "ttc", "distance": "meta.dist"}
    assert (
        tracker.feature_labels["speed"].label == "Speed Head" and tracker.feature_labels["ttc"].label == "Safety Head"
    )
    assert tracker.stages == ("validate", "test") and tracker.hsi_threshold == 0.4


def test_batch_path_never_reads_tensor_values_on_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every per-batch step of the tracker (batch context, per-capture update) runs with the host-reading tensor
    methods disabled: on an accelerator none of them would synchronize."""
    import lightning_attn.metrics.head_tracking as module

    forbidden = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero")
    originals = {name: getattr(torch.Tensor, name) for name in forbidden}
    calls = {"update": 0}

    def guarded(function):
        def wrapper(*args, **kwargs):
            def refuse(name):
                def method(*a, **k):
                    raise AssertionError(f"host read Tensor.{name} in the batch path")

                return method

            for name in forbidden:
                setattr(torch.Tensor, name, refuse(name))
            try:
                return function(*args, **kwargs)
            finally:
                for name, original in originals.items():
                    setattr(torch.Tensor, name, original)

        return wrapper

    original_update = module.HeadSpecializationMetrics.update

    def counting_update(self, *args, **kwargs):
        calls["update"] += 1
        return original_update(self, *args, **kwargs)

    monkeypatch.setattr(module.HeadSpecializationMetrics, "update", guarded(counting_update))
    monkeypatch.setattr(module.HeadTracking, "batch_context", guarded(module.HeadTracking.batch_context))
    tracker = HeadSpecializationTracker(
        features=FEATURES,
        feature_masks={"distance": "agent_mask"},
        chunk_size=6,
        probe_samples=2,
        confidence_exclude_positions=[-1],
        padding_mask_key="agent_mask",
        log_figures=False,
        export_registry=False,
    )
    trainer = pl.Trainer(callbacks=[tracker], limit_val_batches=2, **trainer_kwargs(tmp_path))
    trainer.validate(make_module(), make_loader(64), verbose=False)
    assert calls["update"] == 4  # 2 batches x 2 sites
    assert tracker.history_for("val")[-1]["labels"]["model.layers.0"][3] == "Safety Head"


def test_pairwise_js_equals_the_functional_head_distance() -> None:
    from lightning_attn.functional import head_js_distance
    from lightning_attn.metrics.heads import connected_clusters, pairwise_js_distance

    maps = causal_probs(3, 5, 6, seed=7)
    maps[:, 4] = maps[:, 1]  # an exact duplicate
    fast = pairwise_js_distance(maps)
    assert torch.allclose(fast, head_js_distance(maps).double(), atol=1e-6)
    assert fast[1, 4] == 0 and torch.equal(fast, fast.T)
    assert connected_clusters(fast, 1e-9) == [[1, 4]]
    chain = torch.tensor([[0, 0.1, 0.9], [0.1, 0, 0.1], [0.9, 0.1, 0]])
    assert connected_clusters(chain, 0.1) == [[0, 1, 2]]  # single linkage chains
