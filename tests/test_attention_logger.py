"""AttentionLogger: statistics against an independent computation, chunking, sampling, state, memory, hooks."""

from __future__ import annotations

import gc
import inspect
import sys
import warnings
import weakref
from pathlib import Path

import attention_logger_models as models
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import GuardedHooks, NoHostSync
from helpers import cpu_trainer as trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn

from lightning_attn import AttentionLogger, AttentionRecorder, sinks
from lightning_attn.capture import record as record_module
from lightning_attn.functional import diagonal_mass, mean_attention_distance, normalized_entropy, sparsity
from lightning_attn.metrics.attention import (
    AttentionPositions,
    AttentionStatistics,
    ModalityAgreement,
    ProbeMaps,
    default_reducers,
)
from lightning_attn.metrics.engine import ENGINE

STATS = ["entropy", "max_weight", "sparsity", "distance", "first_token"]
SITES = ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "eeg_to_spec", "spec_to_eeg"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LitLogger.*")


# -- an independent reference ------------------------------------------------------------------------------
def reference_maps(module: nn.Module, data: torch.utils.data.DataLoader) -> dict[str, np.ndarray]:
    """Every batch's maps, from the recorder with keep=True, concatenated over batches (float64)."""
    module.eval()
    collected: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for eeg, spec, _ in data:
            with AttentionRecorder(module) as recorder:
                module(eeg, spec)
            for site, probs in recorder.maps.items():
                collected.setdefault(site, []).append(probs.double().numpy())
    return {site: np.concatenate(maps) for site, maps in collected.items()}


def reference_statistics(probs: np.ndarray, threshold: float = 0.01) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-head (mean, population std) over all (sample, query) rows, written from the definitions."""
    _b, h, q, k = probs.shape
    valid = probs > 0
    n = valid.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1)), 0.0)
        entropy = np.where(n > 1, -plogp.sum(-1) / np.log(np.maximum(n, 2)), 0.0)
    rows = np.arange(q)[:, None]
    cols = np.arange(k)[None, :]
    values = {
        "entropy": entropy,
        "max_weight": probs.max(-1),
        "sparsity": ((probs < threshold) & valid).sum(-1) / np.maximum(n, 1),
        "distance": (probs * np.abs(rows - cols)).sum(-1),
        "first_token": probs[..., 0],
    }
    return {
        name: (v.transpose(1, 0, 2).reshape(h, -1).mean(1), v.transpose(1, 0, 2).reshape(h, -1).std(1))
        for name, v in values.items()
    }


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])


# -- statistics --------------------------------------------------------------------------------------------
def test_statistics_equal_direct_computation_from_recorder_maps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = models.CrossModalModule()
    data = models.loader(12, 4)
    names = [f"e{i}" for i in range(models.EEG_LEN)]
    callback = AttentionLogger(
        chunk_size=4,
        modality_pairs=models.PAIRS,
        log_figures=False,
        top_k=3,
        token_names={"eeg_to_spec:queries": names, "encoder.*": names},
    )
    trainer(tmp_path, [callback]).validate(module, data, verbose=False)
    results = callback.results["val"]
    assert results is callback.results["validate"]
    maps = reference_maps(module, data)
    assert results.sites == SITES == list(maps)
    assert results.kinds == ["self", "self", "cross", "cross"]
    assert results.num_heads == [4, 4, 2, 2]
    for index, site in enumerate(results.sites):
        expected = reference_statistics(maps[site])
        heads = results.num_heads[index]
        for name in STATS:
            mean, std = expected[name]
            np.testing.assert_allclose(
                results.mean[name][index, :heads].numpy(), mean, atol=1e-6, err_msg=f"{site} {name}"
            )
            np.testing.assert_allclose(
                results.std[name][index, :heads].numpy(), std, atol=1e-5, err_msg=f"{site} {name} std"
            )
            assert torch.isnan(results.mean[name][index, heads:]).all()
        probs = maps[site]
        assert results.rows[index, 0] == probs.shape[0] * probs.shape[2]
        # top attended: mean share of a row's attention each key receives
        received = probs.sum((0, 1, 2)) / (probs.shape[0] * probs.shape[1] * probs.shape[2])
        order = np.argsort(-received)[:3]
        got = results.top_attended[site]
        np.testing.assert_allclose([v for _, v in got], received[order], atol=1e-6)
        # top attending: self -> attention given to other positions, cross -> peak weight
        if results.kinds[index] == "self":
            given = 1 - np.diagonal(probs, axis1=2, axis2=3).mean((0, 1))
        else:
            given = probs.max(-1).mean((0, 1))
        np.testing.assert_allclose(
            sorted((v for _, v in results.top_attending[site]), reverse=True), np.sort(given)[::-1][:3], atol=1e-6
        )
    # token names label the axes they match, indices elsewhere
    assert all(label in names for label, _ in results.top_attended["encoder.layers.0.self_attn"])
    assert all(label in names for label, _ in results.top_attending["eeg_to_spec"])
    assert all(isinstance(label, int) for label, _ in results.top_attended["eeg_to_spec"])
    # modality agreement: per-sample correlation of head-mean A->B and (B->A)^T, averaged
    a, b = maps["eeg_to_spec"].mean(1), maps["spec_to_eeg"].mean(1)
    expected_agreement = np.mean([pearson(a[i], b[i].T) for i in range(a.shape[0])])
    assert results.agreement["eeg<->spec"] == pytest.approx(expected_agreement, abs=1e-6)


def test_statistics_with_masks_and_causal_attention() -> None:
    """Masked keys are not keys: entropy normalizes by log(n_valid) and sparsity counts valid keys only."""
    torch.manual_seed(0)
    q, k = torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False

    class Causal(nn.Module):
        def forward(self) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, k, is_causal=True) + F.scaled_dot_product_attention(
                q, k, k, attn_mask=mask
            )

    model = Causal()
    stats = AttentionStatistics(default_reducers(), chunk_size=3)
    with AttentionRecorder(model, keep=True, on_capture=lambda c: stats.update(c.site, c)) as recorder:
        model()
        captured = dict(recorder.maps)
    results = stats.compute()
    assert list(results) == list(captured) == ["Causal", "Causal#1"]
    assert results["Causal#1"].rows.tolist() == [3 * 7] * 2  # every query row has a valid key
    for site, probs in captured.items():
        assert (probs == 0).any()
        expected = reference_statistics(probs.double().numpy())
        for name in STATS:
            np.testing.assert_allclose(
                results[site].mean[name].numpy(), expected[name][0], atol=1e-6, err_msg=f"{site} {name}"
            )


def test_fast_reducers_equal_functional() -> None:
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 9, 11) * 4, -1)
    reducers = default_reducers(0.05)
    torch.testing.assert_close(reducers["entropy"](probs, 0), normalized_entropy(probs), atol=1e-6, rtol=0)
    torch.testing.assert_close(reducers["sparsity"](probs, 0), sparsity(probs, 0.05), atol=0, rtol=0)
    torch.testing.assert_close(reducers["distance"](probs[..., 4:, :], 4), mean_attention_distance(probs)[..., 4:])
    mask = probs > 0.02
    torch.testing.assert_close(reducers["entropy"](probs, 0, key_mask=mask), normalized_entropy(probs, mask))


def test_generic_statistics_metric_custom_reducers_and_chunks() -> None:
    """The metric other callbacks reuse: any reducers, tensors or captures, chunked or not, same numbers."""
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 10, 10), -1)
    reducers = {"prev": lambda p, off: diagonal_mass(p, -1, off)}
    whole = AttentionStatistics(reducers)
    chunked = AttentionStatistics(reducers, chunk_size=3)
    whole.update("s", probs, key_mask=None)
    chunked.update("s", probs, key_mask=None)
    a, b = whole.compute()["s"], chunked.compute()["s"]
    torch.testing.assert_close(a.mean["prev"], b.mean["prev"])
    expected = torch.cat([torch.zeros(2, 3, 1), probs.diagonal(-1, -2, -1)], -1).double()
    torch.testing.assert_close(a.mean["prev"], expected.mean((0, 2)))
    torch.testing.assert_close(a.std["prev"], expected.transpose(0, 1).reshape(3, -1).std(1, unbiased=False))
    assert a.rows.tolist() == [20.0, 20.0, 20.0]
    with pytest.raises(ValueError, match="reducers"):
        AttentionStatistics({})


def test_positions_and_agreement_metrics() -> None:
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 2, 5, 5), -1)
    positions = AttentionPositions(max_positions=4)
    for start in (0, 3):
        positions.update("s", probs[..., start : start + 3, :], start)
    received, given = positions.compute()["s"]
    torch.testing.assert_close(received, probs.mean((0, 1, 2))[:4].double())
    torch.testing.assert_close(given, (1 - probs.diagonal(0, -2, -1).mean((0, 1)))[:4].double())
    agreement = ModalityAgreement()
    a, b = torch.rand(3, 4, 5), torch.rand(3, 5, 4)
    agreement.update("p", a, b)
    expected = np.mean([pearson(a[i].numpy(), b[i].T.numpy()) for i in range(3)])
    assert float(agreement.compute()["p"]) == pytest.approx(expected, abs=1e-6)


def test_probe_maps_pool_rows_and_keys_and_roll_out() -> None:
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 2, 300, 300), -1)
    probe = ProbeMaps(2, max_tokens=128, rollout_max_tokens=512)
    for start in range(0, 300, 64):
        probe.add("s", "self", 300, 300, probs[..., start : start + 64, :], start)
    probe.end_site("s")
    out = probe.finish()
    pooled = out["mean"]["s"]
    assert pooled.shape == (2, 128, 128)
    torch.testing.assert_close(pooled.sum(-1), torch.ones(2, 128))  # still row-stochastic
    index = torch.arange(300) * 128 // 300
    manual = torch.zeros(2, 300, 128).index_add_(-1, index, probs[:2].mean(1))
    manual = torch.zeros(2, 128, 128).index_add_(1, index, manual) / torch.bincount(index)[:, None]
    torch.testing.assert_close(pooled, manual)
    from lightning_attn.functional import attention_rollout

    expected = attention_rollout([probs[:2]])
    assert out["rollout_sites"] == ["s"] and out["rollout"].shape == (2, 128, 128)
    full = ProbeMaps(2, max_tokens=300)
    full.add("s", "self", 300, 300, probs, 0)
    full.end_site("s")
    torch.testing.assert_close(full.finish()["rollout"], expected)


# -- long sequences ----------------------------------------------------------------------------------------
class LongModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def validation_step(self, batch, batch_idx) -> None:
        self.encoder(batch[0])


def test_long_sequence_is_reduced_in_query_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    module = LongModule()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(1, 2048, 32)), batch_size=1)
    rows_per_call: list[int] = []
    original = record_module.attention_scores

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        rows_per_call.append(out.shape[-2])
        return out

    monkeypatch.setattr(record_module, "attention_scores", spy)
    monkeypatch.setattr(ENGINE, "whole_map_bytes", 0)  # chunk however small the map
    chunked = AttentionLogger(chunk_size=256, log_figures=False, max_positions=2048)
    trainer(tmp_path, [chunked]).validate(module, data, verbose=False)
    assert rows_per_call and max(rows_per_call) == 256 and len(rows_per_call) == 2 * 2048 // 256
    rows_per_call.clear()
    whole = AttentionLogger(chunk_size=None, log_figures=False, max_positions=2048)
    trainer(tmp_path, [whole]).validate(module, data, verbose=False)
    assert rows_per_call == [2048, 2048]
    a, b = chunked.results["val"], whole.results["val"]
    for name in STATS:
        torch.testing.assert_close(a.mean[name], b.mean[name], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a.std[name], b.std[name], atol=1e-5, rtol=1e-5)
    for site in a.sites:
        assert [x for x, _ in a.top_attended[site]] == [x for x, _ in b.top_attended[site]]
        np.testing.assert_allclose(
            [v for _, v in a.top_attended[site]], [v for _, v in b.top_attended[site]], atol=1e-7
        )
    assert a.rows[0, 0] == 2048


# -- sampling, stages, dataloaders -------------------------------------------------------------------------
def test_every_n_batches_and_max_batches_sample_batches(tmp_path: Path) -> None:
    module = models.CrossModalModule()
    counts = {}
    for every, most in ((1, None), (2, None), (4, None), (1, 3), (2, 1)):
        callback = AttentionLogger(every_n_batches=every, max_batches=most, log_figures=False)
        captured = []
        original = callback._on_capture
        callback._on_capture = lambda capture, _o=original, _c=captured: (_c.append(capture.site), _o(capture))  # type: ignore[method-assign]
        trainer(tmp_path, [callback]).validate(module, models.loader(32, 4), verbose=False)
        counts[(every, most)] = callback.results["val"].rows[0, 0].item() / (4 * models.EEG_LEN)
        assert len(captured) == counts[(every, most)] * len(SITES)
    assert counts == {(1, None): 8, (2, None): 4, (4, None): 2, (1, 3): 3, (2, 1): 1}


def test_nothing_during_sanity_check_and_separate_dataloaders(tmp_path: Path) -> None:
    seen = {}

    class Inspect(Callback):
        def on_sanity_check_end(self, trainer, pl_module) -> None:
            seen["accumulators"] = dict(callback._states)
            seen["results"] = dict(callback.results)

    callback = AttentionLogger(log_figures=False)
    module = models.CrossModalModule()
    fit = trainer(tmp_path, [callback, Inspect()], max_epochs=1, limit_train_batches=1, num_sanity_val_steps=2)
    fit.fit(module, models.loader(8, 4), [models.loader(8, 4), models.loader(4, 2, seed=1)])
    assert seen == {"accumulators": {}, "results": {}}
    assert set(callback.results) == {"val", "val_dl1"}
    assert callback.results["val"].rows[0, 0] == 8 * models.EEG_LEN
    assert callback.results["val_dl1"].rows[0, 0] == 4 * models.EEG_LEN
    assert "attn/val_dl1/eeg_to_spec/entropy" in fit.callback_metrics
    assert "attn/val/eeg_to_spec/entropy" in fit.callback_metrics


def test_logged_keys_scheme_and_monitoring(tmp_path: Path) -> None:
    callback = AttentionLogger(
        log_per_head=True, modality_pairs=models.PAIRS, log_figures=False, stages=("validate", "test")
    )
    key = "attn/val/encoder.layers.1.self_attn/entropy"
    stop = EarlyStopping(monitor=key, mode="min", patience=0, check_finite=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=key, mode="min")
    fit = trainer(
        tmp_path, [callback, stop, checkpoint], max_epochs=2, limit_train_batches=2, enable_checkpointing=True
    )
    module = models.CrossModalModule()
    fit.fit(module, models.loader(8, 4), models.loader(8, 4))
    metrics = fit.callback_metrics
    for site in SITES:
        for name in STATS:
            assert f"attn/val/{site}/{name}" in metrics
            assert f"attn/val/{site}/h0/{name}" in metrics
    assert f"attn/val/{SITES[0]}/h3/entropy" in metrics and f"attn/val/{SITES[2]}/h2/entropy" not in metrics
    assert "attn/val/eeg<->spec/agreement" in metrics
    mean_over_heads = callback.results["val"].mean["entropy"][1, :4].mean()
    assert float(metrics[key]) == pytest.approx(float(mean_over_heads), abs=1e-6)
    assert checkpoint.best_model_score is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.test(module, models.loader(8, 4, seed=3), verbose=False)  # other data than validation: no probe warning
    assert not [w for w in caught if "probe samples" in str(w.message)]
    assert "attn/test/eeg_to_spec/max_weight" in fit.callback_metrics and "test" in callback.results


def test_results_to_dict_is_json_and_files_written(tmp_path: Path) -> None:
    import json

    callback = AttentionLogger(modality_pairs=models.PAIRS, probe_samples=2, max_figure_sites=2)
    trainer(tmp_path, [callback]).validate(models.CrossModalModule(), models.loader(8, 4), verbose=False)
    data = json.loads(json.dumps(callback.results["val"].to_dict(), allow_nan=False))
    assert list(data["sites"]) == SITES
    assert set(data["sites"]["eeg_to_spec"]["statistics"]) == set(STATS)
    assert len(data["sites"]["encoder.layers.0.self_attn"]["statistics"]["entropy"]["per_head_mean"]) == 4
    directory = tmp_path / "lightning_attn_logs" / "version_0" / "attn" / "val"
    names = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    assert "statistics_epoch0_step0.json" in names and "head_statistics_epoch0_step0.csv" in names
    pngs = sorted(n for n in names if n.endswith(".png"))
    # bounded: 4 summary figures, 2 sites x (maps + heads), rollout, 1 pair
    assert len(pngs) == 4 + 2 * 2 + 1 + 1, pngs
    assert "pairs/eeg<->spec_epoch0_step0.png" in names and "rollout_epoch0_step0.png" in names


# -- state, checkpoints ------------------------------------------------------------------------------------
def test_state_dict_survives_checkpoint_resume(tmp_path: Path) -> None:
    callback = AttentionLogger(log_figures=False, probe_samples=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit = trainer(tmp_path, [callback, checkpoint], max_epochs=2, limit_train_batches=1, enable_checkpointing=True)
    fit.fit(models.CrossModalModule(), models.loader(8, 4), models.loader(8, 4))
    state = callback.state_dict()
    assert (
        state["epochs_run"] == {"validate": 2}
        and state["probe_samples"] == 2
        and state["probe_fingerprints"]["validate"]
    )

    resumed = AttentionLogger(log_figures=False, probe_samples=2)
    assert resumed.state_key == callback.state_key
    fit2 = trainer(
        tmp_path,
        [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
        max_epochs=3,
        limit_train_batches=1,
        enable_checkpointing=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit2.fit(
            models.CrossModalModule(),
            models.loader(8, 4),
            models.loader(8, 4),
            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
        )
    assert not [w for w in caught if "probe samples" in str(w.message)]  # same samples after the resume
    assert resumed.state_dict()["epochs_run"] == {"validate": 3}
    assert resumed.state_dict()["probe_fingerprints"] == state["probe_fingerprints"]
    # other probe samples after the resume (a shuffled loader): a warning
    other = AttentionLogger(log_figures=False, probe_samples=2)
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match="probe samples"):
        trainer(tmp_path, [other]).validate(models.CrossModalModule(), models.loader(8, 4, seed=5), verbose=False)


def test_cli_ready_arguments(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    signature = inspect.signature(AttentionLogger.__init__)
    doc = AttentionLogger.__doc__ or ""
    for name, parameter in list(signature.parameters.items())[1:]:
        assert parameter.annotation is not inspect.Parameter.empty, name
        assert f"    {name}:" in doc, f"{name} undocumented"
        assert parameter.default is None or isinstance(parameter.default, (int, float, str, bool, tuple)), name
    parser = ArgumentParser()
    parser.add_class_arguments(AttentionLogger, "attn")
    config = parser.parse_string(
        "attn:\n  stages: [validate]\n  every_n_batches: 2\n  include: ['encoder.*']\n  chunk_size: 128\n"
        "  modality_pairs: {'eeg<->spec': [eeg_to_spec, spec_to_eeg]}\n  token_names: [a, b, c]\n  log_per_head: true\n"
    )
    callback = AttentionLogger(**dict(config["attn"]))
    assert callback.every_n_batches == 2 and callback.modality_pairs == {"eeg<->spec": ("eeg_to_spec", "spec_to_eeg")}
    assert callback.include == ["encoder.*"] and callback.stages == ("validate",)
    with pytest.raises(ValueError):
        AttentionLogger(stages=("train",))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AttentionLogger(every_n_batches=0)


# -- memory, hooks, figures --------------------------------------------------------------------------------
def _state_sizes(callback: AttentionLogger) -> dict[str, int]:
    sizes = {}
    for (stage, dl), acc in callback._states.items():
        for kind, metric in (("stats", acc.stats), ("positions", acc.positions), ("agreement", acc.agreement)):
            sizes[f"{stage}/{dl}/{kind}"] = sum(getattr(metric, n).numel() for n in metric._defaults)
    return sizes


def test_state_does_not_grow_with_batches(tmp_path: Path) -> None:
    sizes = []
    for batches in (10, 100):
        callback = AttentionLogger(modality_pairs=models.PAIRS, log_figures=False, overhead_budget=None)
        trainer(tmp_path, [callback]).validate(models.CrossModalModule(), models.loader(batches * 2, 2), verbose=False)
        assert callback.results["val"].rows[0, 0] == batches * 2 * models.EEG_LEN
        assert callback._probe is None and callback._probe_inputs.batch is None and callback._recorder is None
        sizes.append(_state_sizes(callback))
    assert sizes[0] == sizes[1] and sum(sizes[0].values()) > 0


def test_no_hooks_or_figures_left_after_20_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.nn.modules import module as module_globals

    figures: list[weakref.ref] = []
    original = sinks.publish_figures

    def spy(trainer, figs, **kwargs):
        figures.extend(weakref.ref(f) for f in figs.values())
        return original(trainer, figs, **kwargs)

    monkeypatch.setattr(sinks, "publish_figures", spy)
    sdpa = F.scaled_dot_product_attention
    hooks_before = (len(module_globals._global_forward_hooks), len(module_globals._global_forward_pre_hooks))
    callback = AttentionLogger(include=["encoder.*"], probe_samples=1, max_figure_sites=1, max_map_tokens=8)
    fit = trainer(tmp_path, [callback], max_epochs=20, limit_train_batches=1, limit_val_batches=1)
    fit.fit(models.CrossModalModule(layers=1), models.loader(4, 4), models.loader(4, 4))
    assert callback.state_dict()["epochs_run"] == {"validate": 20}
    assert len(figures) == 20 * 7  # per epoch: 4 summary figures, maps + heads of the site, rollout
    gc.collect()
    assert [ref for ref in figures if ref() is not None] == []
    assert (
        (len(module_globals._global_forward_hooks), len(module_globals._global_forward_pre_hooks))
        == hooks_before
        == (0, 0)
    )
    assert F.scaled_dot_product_attention is sdpa
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
    assert callback._recorder is None and callback._probe is None


def test_exception_in_step_releases_the_recorder(tmp_path: Path) -> None:
    from torch.nn.modules import module as module_globals

    class Failing(models.CrossModalModule):
        def validation_step(self, batch, batch_idx, dataloader_idx=0) -> None:
            super().validation_step(batch, batch_idx)
            raise RuntimeError("boom")

    callback = AttentionLogger(log_figures=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [callback]).validate(Failing(), models.loader(4, 4), verbose=False)
    assert callback._recorder is None
    assert len(module_globals._global_forward_hooks) == 0


def test_include_exclude_and_figure_cap(tmp_path: Path) -> None:
    callback = AttentionLogger(include=["encoder.*"], exclude=["*.1.*"], log_figures=False)
    trainer(tmp_path, [callback]).validate(models.CrossModalModule(), models.loader(4, 4), verbose=False)
    assert callback.results["val"].sites == ["encoder.layers.0.self_attn"]
    sites = [f"s{i}" for i in range(12)]
    assert AttentionLogger(max_figure_sites=3)._figure_sites(sites) == ["s0", "s6", "s11"]  # evenly spaced, ends kept
    assert AttentionLogger(max_figure_sites=4)._figure_sites(sites) == ["s0", "s4", "s7", "s11"]
    assert AttentionLogger(max_figure_sites=1)._figure_sites(["a", "b"]) == ["b"]


def test_batch_hooks_never_sync_with_the_host(tmp_path: Path) -> None:
    """Every per-batch path (statistics, positions, probe maps, pairs, masked keys) runs under a mode that
    raises on any device-to-host transfer."""

    class Guarded(GuardedHooks, AttentionLogger):
        pass

    callback = Guarded(modality_pairs=models.PAIRS, chunk_size=4, probe_samples=2)
    trainer(tmp_path, [callback]).validate(models.CrossModalModule(), models.loader(8, 4), verbose=False)
    assert Guarded.captures == 2 * len(SITES)
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        torch.ones(2).sum().item()


class TinyBert(pl.LightningModule):
    """A Hugging Face BertModel (default SDPA attention) with padded batches: masked keys."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
        self.bert = BertModel(config)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    def validation_step(self, batch, batch_idx) -> None:
        self(*batch)


def test_hugging_face_sdpa_with_padding_masks_matches_direct_computation(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (6, 9))
    mask = torch.ones(6, 9, dtype=torch.long)
    for row, length in enumerate([9, 7, 4, 9, 2, 6]):
        mask[row, length:] = 0
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, mask), batch_size=3)
    module = TinyBert().eval()
    callback = AttentionLogger(chunk_size=4, log_figures=False)
    trainer(tmp_path, [callback]).validate(module, data, verbose=False)
    results = callback.results["val"]
    maps: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for batch in data:
            with AttentionRecorder(module) as recorder:
                module(*batch)
            for site, probs in recorder.maps.items():
                maps.setdefault(site, []).append(probs.double().numpy())
    assert results.sites == list(maps) and len(results.sites) == 2
    for index, site in enumerate(results.sites):
        probs = np.concatenate(maps[site])
        assert (probs == 0).any()  # padded keys
        expected = reference_statistics(probs)
        for name in STATS:
            np.testing.assert_allclose(
                results.mean[name][index].numpy(), expected[name][0], atol=1e-6, err_msg=f"{site} {name}"
            )
        received = probs.sum((0, 1, 2)) / (probs.shape[0] * probs.shape[1] * probs.shape[2])
        assert [label for label, _ in results.top_attended[site]] == list(np.argsort(-received, kind="stable")[:10])


class CachedStep(nn.Module):
    """One self-attention call over 6 positions, then a decoding step: 1 query against the same 6 keys."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> None:
        q, k = self.qk(x).view(-1, 6, 2, 2, 4).unbind(2)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        F.scaled_dot_product_attention(q, k, k)
        F.scaled_dot_product_attention(q[:, :, -1:], k, k)


class CachedStepModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.attend = CachedStep()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.attend(batch[0])


def test_a_decoding_step_counts_in_the_statistics_not_in_the_position_profile(tmp_path: Path) -> None:
    """A cached step's single query is the last position: it has no diagonal at key 0 and no place at query 0."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 6, 8)), batch_size=2)
    callback = AttentionLogger(log_figures=False, overhead_budget=None)
    trainer(tmp_path, [callback]).validate(CachedStepModule(), data, verbose=False)
    results = callback.results["val"]
    assert results.sites == ["attend", "attend#1"]
    assert results.rows[1].tolist() == [4, 4]  # 4 samples x 1 query per head
    assert results.top_attended["attend"] and results.top_attended["attend#1"] == []
