"""The recording budget (:mod:`lightning_attn.callbacks.budget`): which batches the attention callbacks record.

Each run's statistics are compared with a run that records every batch of a loader holding only the scheduled
batches (an independent reference of what "recording those batches" means), on one process and on 2 DDP ranks.
"""

from __future__ import annotations

import doctest
import json
from pathlib import Path
from typing import Any

import attention_logger_models as models
import budget_ddp_script
import numpy as np
import pytest
import torch
from helpers import GuardedHooks, cpu_trainer, run_ddp_script

from lightning_attn import AttentionLogger, HeadSpecializationTracker, ModuleProbe
from lightning_attn.callbacks import budget
from lightning_attn.callbacks.budget import BudgetCoordinator, batches_to_record, scheduled
from lightning_attn.metrics.coverage import coverage_caption
from lightning_attn.metrics.registry import registry_schema

pytestmark = pytest.mark.usefixtures("one_thread")


def scheduled_batches(total: int, ratio: float | None, budget: float = 0.2, min_batches: int = 8) -> list[int]:
    count = batches_to_record(total, ratio, budget, min_batches)
    return [i for i in range(total) if scheduled(i, total, count)]


def subset_loader(batches: list[int], samples: int, batch_size: int) -> torch.utils.data.DataLoader:
    """The samples of ``batches`` of ``models.loader(samples, batch_size)``, in order, every one recorded."""
    indices = [b * batch_size + j for b in batches for j in range(batch_size)]
    data = torch.utils.data.Subset(models.dataset(samples), indices)
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def assert_same_statistics(got: Any, want: Any) -> None:
    assert got.sites == want.sites
    torch.testing.assert_close(got.rows, want.rows, rtol=0, atol=0, equal_nan=True)
    for name in want.mean:
        torch.testing.assert_close(got.mean[name], want.mean[name], rtol=0, atol=1e-6, equal_nan=True)


def test_docstring_examples() -> None:
    result = doctest.testmod(budget)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), "0.2", True])
def test_invalid_budgets_raise(bad: Any) -> None:
    with pytest.raises(ValueError, match="overhead_budget"):
        AttentionLogger(overhead_budget=bad)
    with pytest.raises(ValueError, match="overhead_budget"):
        HeadSpecializationTracker(overhead_budget=bad)
    with pytest.raises(ValueError, match="min_batches"):
        ModuleProbe(probes={"ff": ("*.linear1", "activation")}, min_batches=0)


def test_schedule_counts_spreads_and_keeps_the_first_batch() -> None:
    for total in (1, 7, 8, 9, 48, 100):
        for count in range(1, total + 1):
            chosen = [i for i in range(total) if scheduled(i, total, count)]
            assert len(chosen) == count and chosen[0] == 0
            gaps = np.diff([*chosen, chosen[0] + total])
            assert gaps.max() - gaps.min() <= 1  # evenly spread, wrapping around
    # the extra cost (n / N)(r - 1) stays within the budget, unless min_batches asks for more
    for ratio in (1.5, 2.0, 5.0, 20.0):
        count = batches_to_record(1000, ratio, 0.2, 8)
        assert count / 1000 * (ratio - 1) <= 0.2 or count == 8


class GuardedLogger(GuardedHooks, AttentionLogger):
    pass


def test_first_epoch_records_min_batches_spread_and_says_so(tmp_path: Path) -> None:
    samples, batch_size = 96, 2  # 48 batches
    logger = GuardedLogger(chunk_size=4, probe_samples=1, log_figures=False)
    tracker = HeadSpecializationTracker(log_figures=False, export_registry=False, probe_samples=1)
    trainer = cpu_trainer(tmp_path, [logger, tracker])
    module = models.CrossModalModule()
    trainer.validate(module, models.loader(samples, batch_size), verbose=False)
    chosen = scheduled_batches(48, None)
    assert len(chosen) == 8 and BudgetCoordinator.of(trainer).ratio is None
    assert logger.coverage["val"] == {"batches": 8, "batches_seen": 48}
    assert trainer.callback_metrics["attn/val/batches"] == 8 and "attn/val/batches_seen" not in trainer.callback_metrics
    coverage = tracker.history_for("val")[-1]["coverage"]
    assert {"batches": coverage["batches"], "batches_seen": coverage["batches_seen"]} == logger.coverage["val"]
    assert trainer.callback_metrics["heads/val/batches"] == 8

    reference = AttentionLogger(chunk_size=4, probe_samples=1, log_figures=False, overhead_budget=None)
    reference_tracker = HeadSpecializationTracker(
        log_figures=False, export_registry=False, probe_samples=1, overhead_budget=None
    )
    cpu_trainer(tmp_path / "ref", [reference, reference_tracker]).validate(
        module, subset_loader(chosen, samples, batch_size), verbose=False
    )
    assert_same_statistics(logger.results["val"], reference.results["val"])
    got, want = tracker.history_for("val")[-1], reference_tracker.history_for("val")[-1]
    assert got["rows"] == want["rows"]  # one decision per batch: the tracker recorded the logger's batches
    for site, values in want["statistics"].items():
        np.testing.assert_allclose(got["statistics"][site]["entropy"], values["entropy"], atol=1e-6)


def test_json_and_tables_say_what_the_statistics_cover(tmp_path: Path) -> None:
    samples, batch_size = 96, 2  # 48 batches, min_batches (8) recorded in a first epoch
    logger = AttentionLogger(chunk_size=4, probe_samples=0, log_figures=False)
    tracker = HeadSpecializationTracker(log_figures=False, probe_samples=0)
    probe = ModuleProbe(probes={"ff": ("*.linear1", "activation")}, log_figures=False)
    trainer = cpu_trainer(tmp_path, [logger, tracker, probe])
    trainer.validate(models.CrossModalModule(), models.loader(samples, batch_size), verbose=False)
    run = tmp_path / "lightning_attn_logs" / "version_0"  # <run folder>/<callback>/<stage>/<output>_epoch<E>_step<S>
    batches = {"batches": 8, "batches_seen": 48}
    assert logger.coverage["val"] == probe.coverage["val"] == batches
    recorded_samples = 8 * batch_size
    queries = {f"encoder.layers.{i}.self_attn": models.EEG_LEN for i in (0, 1)}
    queries |= {"eeg_to_spec": models.EEG_LEN, "spec_to_eeg": models.SPEC_LEN}
    attention = json.loads((run / "attn" / "val" / "statistics_epoch0_step0.json").read_text())["coverage"]
    assert attention == {**batches, "rows": {s: recorded_samples * q for s, q in queries.items()}}
    registry = json.loads((run / "heads" / "val" / "head_functions_epoch0_step0.json").read_text())
    assert registry["coverage"] == tracker.history_for("val")[-1]["coverage"] == attention
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(registry, registry_schema())
    probes = json.loads((run / probe.name / "val" / "statistics_epoch0_step0.json").read_text())["coverage"]
    linear = {f"encoder.layers.{i}.linear1": recorded_samples * models.EEG_LEN for i in (0, 1)}
    assert probes == {**batches, "rows": linear}
    fewest, most = recorded_samples * models.SPEC_LEN, recorded_samples * models.EEG_LEN
    caption = coverage_caption(attention, logger.overhead_budget)
    assert caption == f"recorded 8 of 48 batches (budget 20%), {fewest} to {most} rows per site"


def test_second_epoch_uses_the_measured_cost(tmp_path: Path) -> None:
    samples, batch_size = 96, 2
    logger = AttentionLogger(chunk_size=4, probe_samples=0, log_figures=False, min_batches=4)
    trainer = cpu_trainer(tmp_path, [logger])
    module, loader = models.CrossModalModule(), models.loader(samples, batch_size)
    trainer.validate(module, loader, verbose=False)
    trainer.validate(module, loader, verbose=False)
    ratio = BudgetCoordinator.of(trainer).ratio
    assert ratio is not None and ratio > 0
    chosen = scheduled_batches(48, ratio, min_batches=4)
    assert logger.coverage["val"] == {"batches": len(chosen), "batches_seen": 48}
    reference = AttentionLogger(chunk_size=4, probe_samples=0, log_figures=False, overhead_budget=None)
    cpu_trainer(tmp_path / "ref", [reference]).validate(
        module, subset_loader(chosen, samples, batch_size), verbose=False
    )
    assert_same_statistics(logger.results["val"], reference.results["val"])


def test_short_epochs_and_own_sampling_ignore_the_budget(tmp_path: Path) -> None:
    short = AttentionLogger(log_figures=False, probe_samples=0)
    every_other = AttentionLogger(log_figures=False, probe_samples=0, every_n_batches=2, name="other")
    cpu_trainer(tmp_path, [short]).validate(models.CrossModalModule(), models.loader(10, 2), verbose=False)
    assert short.coverage["val"] == {"batches": 5, "batches_seen": 5}  # fewer than min_batches: all
    cpu_trainer(tmp_path, [every_other]).validate(models.CrossModalModule(), models.loader(80, 2), verbose=False)
    assert every_other.coverage["val"] == {"batches": 20, "batches_seen": 40}


@pytest.mark.ddp
def test_ddp_with_the_budget_equals_one_process_recording_the_same_batches(tmp_path: Path) -> None:
    ddp = run_ddp_script(budget_ddp_script.__file__, tmp_path)
    assert ddp["world_size"] == 2
    first, second = ddp["epochs"]
    assert first["ratio"] is None and second["ratio"] is not None
    assert ddp["ratios"] == [second["ratio"]] * 2  # every rank agreed on the cost
    per_rank = budget_ddp_script.SAMPLES // budget_ddp_script.BATCH_SIZE // 2
    for epoch in (first, second):
        chosen = scheduled_batches(per_rank, epoch["ratio"])
        assert epoch["coverage"] == {"batches": 2 * len(chosen), "batches_seen": 2 * per_rank}
        # DistributedSampler (no shuffle): rank r's local sample p is global sample 2 p + r
        size = budget_ddp_script.BATCH_SIZE
        indices = sorted(2 * (b * size + j) + r for b in chosen for j in range(size) for r in (0, 1))
        data = torch.utils.data.Subset(models.dataset(budget_ddp_script.SAMPLES), indices)
        reference = AttentionLogger(chunk_size=4, probe_samples=0, log_figures=False, overhead_budget=None)
        torch.manual_seed(0)  # the script's model: reproducible() seeds 0 before building it
        cpu_trainer(tmp_path / "ref", [reference]).validate(
            models.CrossModalModule(), torch.utils.data.DataLoader(data, batch_size=size), verbose=False
        )
        want = reference.results["val"]
        assert epoch["sites"] == want.sites
        np.testing.assert_array_equal(np.array(epoch["rows"], dtype=float), want.rows.numpy())
        for name, values in want.mean.items():
            np.testing.assert_allclose(np.array(epoch["mean"][name], dtype=float), values.numpy(), atol=1e-6)
