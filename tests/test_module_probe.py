"""ModuleProbe: streamed statistics against values computed directly from the module outputs, the unmatched-probe
error, hook lifetime, no host sync, figures and files, CLI arguments and the StockFormer example's probes."""

from __future__ import annotations

import gc
import inspect
import json
import math
import sys
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import module_probe_models as models
import numpy as np
import pytest
import torch
import yaml
from helpers import GuardedHooks, NoHostSync
from helpers import cpu_trainer as trainer

from lightning_attn import AttentionLogger, AttentionRecorder, ModuleProbe, sinks
from lightning_attn.capture.probes import ModuleHooks, ProbeMatchError, first_tensor, parse_probes, resolve_probes
from lightning_attn.metrics.probe_stream import ProbeStream
from lightning_attn.metrics.probes import (
    ActivationStatistics,
    ProbeStatistics,
    WeightHistogram,
    activation_view,
    weights_view,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:lightning"), pytest.mark.usefixtures("one_thread")]


def _pop_std(values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return values.std(dims, unbiased=False)


# -- statistics against the module outputs -----------------------------------------------------------------------
def test_streamed_statistics_equal_direct_values(tmp_path: Path) -> None:
    data = models.dataset(16)
    x, g, p, _ = (t.double() if t.is_floating_point() else t for t in data.tensors)
    threshold, bins = 0.05, 10
    callback = ModuleProbe(
        models.PROBES, histogram_sites=["attn"], histogram_bins=bins, saturation_threshold=threshold, log_figures=False
    )
    fit = trainer(tmp_path, [callback])
    module = models.GatedPoolModule()
    fit.validate(module, models.loader(16, 4), verbose=False)
    results = callback.results["val"]
    assert results.probes["gate"]["sites"] == ["layers.0.gate", "layers.1.gate"]
    assert list(results.activations) == ["layers.0.gate", "layers.1.gate", "pool.softmax", "heads_pool.softmax"]

    # gates: sigmoid((i + 1) * g), known without the model
    for layer in range(models.LAYERS):
        gate = torch.sigmoid((layer + 1) * g)  # [N, L, C]
        summary = results.activations[f"layers.{layer}.gate"]
        torch.testing.assert_close(summary.position_mean, gate.mean((0, 2)), atol=1e-6, rtol=0)
        torch.testing.assert_close(summary.position_std, _pop_std(gate, (0, 2)), atol=1e-6, rtol=0)
        torch.testing.assert_close(summary.channel_mean, gate.mean((0, 1)), atol=1e-6, rtol=0)
        torch.testing.assert_close(summary.channel_std, _pop_std(gate, (0, 1)), atol=1e-6, rtol=0)
        saturated = ((gate <= threshold) | (gate >= 1 - threshold)).double()
        torch.testing.assert_close(summary.position_saturated, saturated.mean((0, 2)), atol=1e-12, rtol=0)
        torch.testing.assert_close(summary.channel_saturated, saturated.mean((0, 1)), atol=1e-12, rtol=0)
        assert summary.mean == pytest.approx(float(gate.mean()), abs=1e-6)
        assert summary.std == pytest.approx(float(gate.std(unbiased=False)), abs=1e-6)
        assert summary.saturation_low == pytest.approx(float((gate <= threshold).double().mean()), abs=1e-12)
        assert summary.saturation_high == pytest.approx(float((gate >= 1 - threshold).double().mean()), abs=1e-12)
        assert summary.saturation_low > 0 and summary.saturation_high > 0  # the data reaches both ends
        assert fit.callback_metrics[f"probe/val/layers.{layer}.gate/mean"].item() == pytest.approx(
            summary.mean, abs=1e-6
        )

    # pooling: softmax(p) [N, L] and the two-head softmax [N, 2, L], as attention rows
    length = models.LENGTH
    for site, weights in (
        ("pool.softmax", torch.softmax(p, -1)[:, None]),
        ("heads_pool.softmax", torch.softmax(models.known_head_logits(p), -1)),
    ):
        heads = weights.shape[1]
        entropy = -(weights * weights.log()).sum(-1) / math.log(length)  # [N, H]
        peak = weights.max(-1).values
        mean_position = (weights * torch.arange(length, dtype=torch.float64)).sum(-1)
        stats = results.weights[site]
        assert stats.rows.tolist() == [16.0] * heads
        for name, direct in (
            ("entropy", entropy),
            ("max_weight", peak),
            ("distance", mean_position),
            ("first_token", weights[..., 0]),
        ):
            torch.testing.assert_close(stats.mean[name], direct.mean(0), atol=1e-5, rtol=0, msg=f"{site} {name}")
            torch.testing.assert_close(stats.std[name], _pop_std(direct, (0,)), atol=1e-5, rtol=0, msg=f"{site} {name}")
        torch.testing.assert_close(stats.mean["sparsity"], (weights < 0.01).double().mean((0, 2)), atol=1e-6, rtol=0)
        # the mean and spread of each position's weight across samples (per head and over heads)
        summary = results.activations[site]
        torch.testing.assert_close(summary.position_mean, weights.mean((0, 1)), atol=1e-6, rtol=0)
        torch.testing.assert_close(summary.position_std, _pop_std(weights, (0, 1)), atol=1e-6, rtol=0)
        torch.testing.assert_close(summary.joint_mean, weights.mean(0).T, atol=1e-6, rtol=0)
        torch.testing.assert_close(summary.joint_std, _pop_std(weights, (0,)).T, atol=1e-6, rtol=0)
        # top positions: the mean weight of each position (over samples and heads), highest first
        share = weights.mean((0, 1))
        top = results.top_positions[site]
        assert [position for position, _ in top] == share.argsort(descending=True).tolist()
        np.testing.assert_allclose([value for _, value in top], share.sort(descending=True).values.numpy(), atol=1e-6)
        # histograms on [0, 1], per head
        counts = results.histograms[site]
        for head in range(heads):
            expected, _ = np.histogram(weights[:, head].numpy(), bins=bins, range=(0, 1))
            np.testing.assert_array_equal(counts[head].numpy(), expected)
        assert fit.callback_metrics[f"probe/val/{site}/entropy"].item() == pytest.approx(
            float(entropy.mean(0).mean()), abs=1e-5
        )

    # attention histogram of the chosen site, against the recorder's maps of the same inputs
    module.eval()
    with torch.no_grad(), AttentionRecorder(module, include=["attn"]) as recorder:
        module(*(t.float() for t in (x, g, p)))
        maps = recorder.maps["attn"]  # [N, 2, L, L]
    counts = results.histograms["attn"]
    assert counts.shape == (2, bins) and counts.sum().item() == 16 * 2 * length * length
    for head in range(2):
        expected, _ = np.histogram(maps[:, head].numpy(), bins=bins, range=(0, 1))
        np.testing.assert_array_equal(counts[head].numpy(), expected)

    # the JSON form carries the same numbers
    data = results.to_dict()
    assert data["sites"]["layers.1.gate"]["activation"]["mean"] == results.activations["layers.1.gate"].mean
    assert (
        data["sites"]["pool.softmax"]["statistics"]["entropy"]["per_head_mean"]
        == results.weights["pool.softmax"].mean["entropy"].tolist()
    )
    assert set(data["histograms"]) == {"attn", "pool.softmax", "heads_pool.softmax"}
    json.dumps(data, allow_nan=False)


def test_metric_pieces_and_shapes() -> None:
    assert activation_view(torch.zeros(2, 3, 4)).shape == (2, 3, 4)
    assert activation_view(torch.zeros(2, 4)).shape == (2, 1, 4)
    assert activation_view(torch.zeros(2)).shape == (2, 1, 1)
    assert activation_view(torch.zeros(2, 3, 4, 5)).shape == (2, 3, 20)
    assert weights_view(torch.zeros(2, 7)).shape == (2, 1, 1, 7)
    assert weights_view(torch.zeros(2, 7, 1)).shape == (2, 1, 1, 7)
    assert weights_view(torch.zeros(2, 3, 7)).shape == (2, 3, 1, 7)
    assert weights_view(torch.zeros(2, 3, 5, 7)).shape == (2, 3, 5, 7)
    # variable lengths: each position averaged where it occurred; max_positions caps the position state only
    stats = ActivationStatistics(max_positions=3)
    a, b = torch.rand(2, 4, 3), torch.rand(5, 2, 3)
    stats.update("s", a)
    stats.update("s", b)
    summary = stats.compute()["s"]
    assert summary.position_count.tolist() == [3 * 7, 3 * 7, 3 * 2]
    torch.testing.assert_close(summary.position_mean[2], a[:, 2].double().mean())
    torch.testing.assert_close(summary.channel_mean, torch.cat([a.reshape(-1, 3), b.reshape(-1, 3)]).double().mean(0))
    # weight 1.0 goes in the last bin; masked keys are not counted
    histogram = WeightHistogram(4)
    histogram.update("s", torch.tensor([[[[1.0, 0.0, 0.0]]]]))
    assert histogram.compute()["s"].tolist() == [[0.0, 0.0, 0.0, 1.0]]
    histogram.update("s", torch.tensor([[[[0.5, 0.5, 0.0]]]]), key_mask=None)
    assert histogram.compute()["s"].tolist() == [[1.0, 0.0, 2.0, 1.0]]
    # a full [B, H, Q, K] map as "weights": attention measures and histogram, no position view
    bundle = ProbeStatistics(bins=5)
    maps = torch.softmax(torch.randn(2, 3, 4, 4), -1)
    bundle.update_weights("map", maps, histogram=True)
    activations, weights, _, histograms = bundle.compute()
    assert (
        "map" not in activations
        and weights["map"].rows.tolist() == [8.0] * 3
        and histograms["map"].sum().item() == 2 * 3 * 16
    )
    assert (
        first_tensor((maps, None)) is maps and first_tensor({"a": 1, "b": maps}) is maps and first_tensor([1]) is None
    )
    with pytest.raises(ValueError, match="kind"):
        parse_probes({"x": ("a", "gates")})
    with pytest.raises(ValueError, match="glob, kind"):
        parse_probes({"x": "a"})


# -- matching ------------------------------------------------------------------------------------------------------
def test_unmatched_probes_give_one_clear_error(tmp_path: Path) -> None:
    module = models.GatedPoolModule()
    specs = parse_probes(
        {"gate": ("layer.*.gate", "activation"), "pool": ("pool.softmx", "weights"), "ok": ("attn", "activation")}
    )
    with pytest.raises(ProbeMatchError) as error:
        resolve_probes(module, specs)
    message = str(error.value)
    assert "'layer.*.gate'" in message and "'layers.0.gate'" in message and "'layers.1.gate'" in message
    assert "'pool.softmx'" in message and "'pool.softmax'" in message
    assert "'attn'" not in message.split("close module names")[0]  # the matching probe is not reported
    nothing_close = parse_probes({"x": ("zzzzqqqq", "activation")})
    with pytest.raises(ProbeMatchError, match="no close module names"):
        resolve_probes(module, nothing_close)
    # through the Trainer: one error before the first batch (see test_unmatched_probes_fail_before_the_first_batch)
    callback = ModuleProbe({"gate": ("layer.*.gate", "activation")}, log_figures=False)
    with pytest.raises(
        ValueError, match=r"pattern 'layer\.\*\.gate' matches no module .*close module names: .*'layers\.0\.gate'"
    ):
        trainer(tmp_path, [callback]).validate(module, models.loader(4, 4), verbose=False)
    assert all(not m._forward_hooks for m in module.modules())
    # wrapper prefixes are stripped before matching
    wrapper = torch.nn.Module()
    wrapper.module = module
    assert [
        name
        for name, _ in resolve_probes(wrapper, parse_probes({"g": ("layers.*.gate", "activation")}))[
            parse_probes({"g": ("layers.*.gate", "activation")})[0]
        ]
    ] == ["layers.0.gate", "layers.1.gate"]


class _CountingModule(models.GatedPoolModule):
    """Counts the training and validation steps that ran."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.steps += 1
        super().validation_step(batch, batch_idx, dataloader_idx)


class _ConfiguredGatesModule(models.GatedPoolModule):
    """Builds its gated layers in ``configure_model``, which Lightning calls after the callbacks' ``setup``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList()

    def configure_model(self) -> None:
        if not len(self.layers):
            self.layers.extend(models.GateLayer() for _ in range(models.LAYERS))


def test_unmatched_probes_fail_before_the_first_batch(tmp_path: Path) -> None:
    unmatched = {"gate": ("layer.*.gate", "activation")}
    message = r"probe 'gate': pattern 'layer\.\*\.gate' matches no module .*close module names: .*'layers\.0\.gate'"
    module = _CountingModule()
    with pytest.raises(ProbeMatchError, match=message):
        trainer(tmp_path, [ModuleProbe(unmatched, log_figures=False)]).validate(module, models.loader(4, 4))
    assert module.steps == 0 and all(not m._forward_hooks for m in module.modules())
    # fit: in the sanity check (which the probe does not record), not after a training epoch
    module = _CountingModule()
    fit = trainer(tmp_path, [ModuleProbe(unmatched, log_figures=False)], max_epochs=1, num_sanity_val_steps=1)
    with pytest.raises(ProbeMatchError, match=message):
        fit.fit(module, models.loader(4, 4), models.loader(4, 4))
    assert module.steps == 0 and all(not m._forward_hooks for m in module.modules())
    # modules built by configure_model (after setup) are matched
    callback = ModuleProbe({"gate": ("layers.*.gate", "activation")}, log_figures=False)
    trainer(tmp_path, [callback]).validate(_ConfiguredGatesModule(), models.loader(4, 4), verbose=False)
    assert callback.results["val"].probes["gate"]["sites"] == ["layers.0.gate", "layers.1.gate"]


def test_save_dir_that_is_a_file_fails_at_setup(tmp_path: Path) -> None:
    path = tmp_path / "outputs"
    path.write_text("")
    for save_dir in (path, path / "probes"):
        module = _CountingModule()
        callback = ModuleProbe(models.PROBES, save_dir=str(save_dir))
        with pytest.raises(NotADirectoryError, match=f"ModuleProbe save_dir: {path} exists and is a file"):
            trainer(tmp_path, [callback]).validate(module, models.loader(4, 4), verbose=False)
        assert module.steps == 0


# -- hooks ---------------------------------------------------------------------------------------------------------
def _hooked(module: torch.nn.Module) -> dict[str, int]:
    return {name: len(m._forward_hooks) for name, m in module.named_modules() if m._forward_hooks}


class _HookSpy(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, int]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen.append(_hooked(pl_module))


def test_hooks_live_for_the_evaluation_epoch_only(tmp_path: Path) -> None:
    from torch.nn.modules import module as module_globals

    module = models.GatedPoolModule()
    spy = _HookSpy()
    callback = ModuleProbe(models.PROBES, histogram_sites=["attn"], max_batches=2, log_figures=False)
    fit = trainer(tmp_path, [callback, spy], max_epochs=2, limit_train_batches=2, num_sanity_val_steps=1)
    fit.fit(module, models.loader(8, 4), models.loader(16, 4))
    expected = {"layers.0.gate": 1, "layers.1.gate": 1, "pool.softmax": 1, "heads_pool.softmax": 1}
    assert spy.seen and all(seen == expected for seen in spy.seen[1:])  # after the sanity check: hooked
    assert spy.seen[0] == {}  # the sanity check is skipped: no hooks
    assert _hooked(module) == {}
    assert len(module_globals._global_forward_hooks) == 0 and callback._hooks is None and callback._recorder is None
    assert callback.state_dict() == {"epochs_run": {"validate": 2}}
    # max_batches=2 of 4 batches: 8 samples
    assert callback.results["val"].weights["pool.softmax"].rows.tolist() == [8.0]

    class Failing(models.GatedPoolModule):
        def validation_step(self, batch, batch_idx, dataloader_idx=0) -> None:
            super().validation_step(batch, batch_idx)
            if batch_idx == 1:
                raise RuntimeError("boom")

    failing = Failing()
    callback = ModuleProbe(models.PROBES, histogram_sites=["attn"], log_figures=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [callback]).validate(failing, models.loader(16, 4), verbose=False)
    assert _hooked(failing) == {} and callback._hooks is None and callback._recorder is None
    assert len(module_globals._global_forward_hooks) == 0
    # the partial epoch does not leak into the next run
    trainer(tmp_path, [callback]).validate(models.GatedPoolModule(), models.loader(8, 4), verbose=False)
    assert callback.results["val"].weights["pool.softmax"].rows.tolist() == [8.0]


def test_repeated_calls_and_module_hooks() -> None:
    module = models.GatedPoolModule()
    outputs: list[tuple[str, str, tuple[int, ...]]] = []
    specs = parse_probes(
        {
            "gate": ("layers.0.gate", "activation"),
            "again": ("layers.0.gate", "activation"),
            "w": ("layers.0.gate", "weights"),
        }
    )
    with ModuleHooks(module, specs, lambda spec, site, t: outputs.append((spec.name, site, tuple(t.shape)))) as hooks:
        assert hooks.num_hooks == 2  # one per (module, kind)
        gate = module.layers[0].gate
        gate(torch.zeros(2, 3))
        gate(torch.zeros(2, 3))
        hooks.new_step()
        gate(torch.zeros(2, 3))
    assert [o[:2] for o in outputs] == [
        ("gate", "layers.0.gate"),
        ("w", "layers.0.gate"),
        ("gate", "layers.0.gate#1"),
        ("w", "layers.0.gate#1"),
        ("gate", "layers.0.gate"),
        ("w", "layers.0.gate"),
    ]
    assert _hooked(module) == {}


def test_batch_hooks_never_sync_with_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"on_output": 0, "on_capture": 0}

    def guarded(name: str) -> Any:
        method = getattr(ProbeStream, name)

        def run(self: ProbeStream, *args: Any) -> None:
            calls[name] += 1
            with NoHostSync():
                method(self, *args)

        return run

    for name in calls:  # the module and attention hooks feed the callback's stream
        monkeypatch.setattr(ProbeStream, name, guarded(name))

    class Guarded(GuardedHooks, ModuleProbe):
        pass

    callback = Guarded(models.PROBES, histogram_sites=["attn"], probe_samples=2, chunk_size=2, log_figures=False)
    trainer(tmp_path, [callback]).validate(models.GatedPoolModule(), models.loader(8, 4), verbose=False)
    assert calls == {"on_output": 2 * 4, "on_capture": 2}
    assert set(callback.results["val"].samples) == {
        "layers.0.gate",
        "layers.1.gate",
        "pool.softmax",
        "heads_pool.softmax",
    }


# -- figures, files, probe samples ---------------------------------------------------------------------------------
def test_figures_files_and_shared_probe_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures: dict[str, weakref.ref] = {}
    original = sinks.publish_figures

    def spy(trainer, figs, **kwargs):
        figures.update({name: weakref.ref(f) for name, f in figs.items()})
        return original(trainer, figs, **kwargs)

    monkeypatch.setattr(sinks, "publish_figures", spy)
    labels = [f"t{i}" for i in range(models.LENGTH)]
    logger = AttentionLogger(probe_samples=3, log_figures=False)
    callback = ModuleProbe(
        models.PROBES, histogram_sites=["attn"], position_names=labels, max_channels=3, save_dir=str(tmp_path / "out")
    )
    trainer(tmp_path, [logger, callback]).validate(models.GatedPoolModule(), models.loader(16, 4), verbose=False)
    results = callback.results["validate"]
    data = models.dataset(16).tensors
    # probe samples are the AttentionLogger's: the first 3 samples of the first batch
    assert results.samples["layers.1.gate"].shape == (3, models.LENGTH, models.CHANNELS)
    torch.testing.assert_close(results.samples["layers.1.gate"], torch.sigmoid(2 * data[1][:3]))
    torch.testing.assert_close(results.samples["pool.softmax"], torch.softmax(data[2][:3], -1)[:, None])
    assert results.top_positions["pool.softmax"][0][0] in labels
    assert sorted(figures) == sorted(
        [
            "val/gate/over_time",
            "val/gate/heatmap",
            "val/pool/over_time",
            "val/pool/statistics",
            "val/pool/top_positions",
            "val/heads/over_time",
            "val/heads/statistics",
            "val/heads/top_positions",
            "val/histograms",
        ]
    )
    gc.collect()
    assert [name for name, ref in figures.items() if ref() is not None] == []
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
    out = tmp_path / "out" / "probe" / "val"
    assert len(list(out.rglob("*_epoch0_step0.png"))) == len(figures)
    saved = json.loads((out / "statistics_epoch0_step0.json").read_text())
    assert saved["probes"]["gate"] == {
        "pattern": "layers.*.gate",
        "kind": "activation",
        "sites": ["layers.0.gate", "layers.1.gate"],
    }
    assert (out / "summary_epoch0_step0.csv").read_text().count("\n") == 1 + 4


def test_cli_ready_arguments() -> None:
    from jsonargparse import ArgumentParser

    signature = inspect.signature(ModuleProbe.__init__)
    doc = ModuleProbe.__doc__ or ""
    for name, parameter in list(signature.parameters.items())[1:]:
        assert parameter.annotation is not inspect.Parameter.empty, name
        assert f"    {name}:" in doc, f"{name} undocumented"
        assert (
            parameter.default is None
            or parameter.default is inspect.Parameter.empty
            or isinstance(parameter.default, (int, float, str, bool, tuple))
        ), name
    parser = ArgumentParser()
    parser.add_class_arguments(ModuleProbe, "probe")
    config = parser.parse_string(
        "probe:\n  probes: {gate: [layers.*.gate, activation], pool: [pool.softmax, weights]}\n"
        "  histogram_sites: ['layers.*.cross_attn']\n  saturation_threshold: 0.1\n"
    )
    callback = ModuleProbe(**dict(config["probe"]))
    assert callback.probes == {"gate": ("layers.*.gate", "activation"), "pool": ("pool.softmax", "weights")}
    assert callback.histogram_sites == ["layers.*.cross_attn"] and callback.saturation_threshold == 0.1
    with pytest.raises(ValueError):
        ModuleProbe({})
    with pytest.raises(ValueError):
        ModuleProbe(models.PROBES, saturation_threshold=0.5)


# -- the time-series example ---------------------------------------------------------------------------------------
def test_stockformer_example_probes_its_gates_and_pooling(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    sys.path.insert(0, str(ROOT))
    from examples.stockformer import MarketDataModule, StockFormer

    config = yaml.safe_load((ROOT / "configs" / "stockformer.yaml").read_text())
    entries = [
        c
        for c in config["trainer"]["callbacks"]
        if c["class_path"] in ("lightning_attn.ModuleProbe", "lightning_attn.callbacks.ModuleProbe")
    ]
    assert len(entries) == 1, "configs/stockformer.yaml declares no ModuleProbe"
    parser = ArgumentParser()
    parser.add_class_arguments(ModuleProbe, "probe")
    init = dict(parser.parse_object({"probe": entries[0]["init_args"]})["probe"])
    init.update(save_dir=None, log_figures=False, every_n_epochs=1)
    callback = ModuleProbe(**init)
    kinds = {kind for _, kind in callback.probes.values()}
    assert kinds == {"activation", "weights"}
    data = MarketDataModule(num_train=8, num_val=16, num_test=8, batch_size=8)
    trainer(tmp_path, [callback], limit_val_batches=1).validate(StockFormer(num_layers=2), data, verbose=False)
    results = callback.results["val"]
    gates = [
        s
        for s in results.activations
        if s.endswith(".gate")
        and s in results.probe_sites(next(n for n, (_, k) in callback.probes.items() if k == "activation"))
    ]
    assert gates == ["layers.0.gate", "layers.1.gate"]
    for site in gates:
        summary = results.activations[site]
        assert summary.position_mean.shape == (32,) and summary.channel_mean.shape == (64,)
        assert summary.position_mean.min() >= 0 and summary.position_mean.max() <= 1
    assert list(results.weights) == ["pool.softmax"]
    pool = results.activations["pool.softmax"]
    assert pool.position_mean.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert results.weights["pool.softmax"].rows.tolist() == [8.0]
    assert any(site.endswith("cross_attn") for site in results.histograms)


class MaskedGateModule(models.GatedPoolModule):
    """The gated model on batches ``(x, g, p, y, mask)``: the mask marks the valid positions of each sample."""

    def _loss(self, batch: Any) -> torch.Tensor:
        return super()._loss(batch[:4])


def test_mask_key_leaves_padded_positions_out_of_activation_statistics(tmp_path: Path) -> None:
    x, g, p, y = models.dataset(16).tensors
    lengths = torch.tensor([models.LENGTH, 3, 4, 1] * 4)
    mask = torch.arange(models.LENGTH)[None] < lengths[:, None]  # [N, L]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, g, p, y, mask), batch_size=4)
    callback = ModuleProbe({"gate": ("layers.0.gate", "activation")}, mask_key=4, log_figures=False)
    trainer(tmp_path, [callback]).validate(MaskedGateModule(), loader, verbose=False)
    summary = callback.results["val"].activations["layers.0.gate"]

    gate = torch.sigmoid(g.double())  # [N, L, C]; layer 0 multiplies the logits by 1
    valid = mask[:, :, None].expand_as(gate)
    for position in range(models.LENGTH):
        values = gate[:, position][valid[:, position]]
        assert summary.position_count[position] == values.numel()
        assert float(summary.position_mean[position]) == pytest.approx(float(values.mean()), abs=1e-6)
        assert float(summary.position_std[position]) == pytest.approx(float(values.std(unbiased=False)), abs=1e-6)
    for channel in range(models.CHANNELS):
        values = gate[..., channel][mask]
        assert float(summary.channel_mean[channel]) == pytest.approx(float(values.mean()), abs=1e-6)
    assert summary.mean == pytest.approx(float(gate[valid].mean()), abs=1e-6)
    saturated = (gate[valid] <= 0.05) | (gate[valid] >= 0.95)
    assert summary.saturated == pytest.approx(float(saturated.double().mean()), abs=1e-12)
    assert summary.mean != pytest.approx(float(gate.mean()), abs=1e-4)  # the padding would have moved it


def test_mask_key_errors_name_the_key_and_the_shapes(tmp_path: Path) -> None:
    x, g, p, y = models.dataset(4).tensors
    for key, error, match in (
        (7, KeyError, "mask_key 7"),
        (0, ValueError, "must select a \\[batch, positions\\] tensor"),
    ):
        callback = ModuleProbe({"gate": ("layers.0.gate", "activation")}, mask_key=key, log_figures=False)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, g, p, y, torch.ones(4, 5, dtype=torch.bool)), batch_size=4
        )
        with pytest.raises(error, match=match):
            trainer(tmp_path, [callback]).validate(MaskedGateModule(), loader, verbose=False)
    callback = ModuleProbe({"gate": ("layers.0.gate", "activation")}, mask_key=4, log_figures=False)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, g, p, y, torch.ones(4, 5, dtype=torch.bool)), batch_size=4
    )
    with pytest.raises(ValueError, match="position mask of shape \\(4, 5\\)"):
        trainer(tmp_path, [callback]).validate(MaskedGateModule(), loader, verbose=False)
