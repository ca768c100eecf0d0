"""A shared tester for every torchmetrics ``Metric`` of :mod:`lightning_attn.metrics`, in the spirit of torchmetrics'
``MetricTester``: batch-split invariance (one batch vs many), DDP equality on 2 CPU ranks, constant state size over
10 and 1,000 batches, and a float64 reference.

Every Metric class is found by introspection (:func:`metric_classes`); each needs a :class:`Case` in :data:`CASES`
(how to build it, a data set, how to feed a batch, and where one exists a float64 reference computed
independently). A new class without a case fails ``test_every_metric_class_has_a_case``.

Also the DDP script (not collected by pytest), run by the tests as one subprocess for all classes::

    python tests/metric_tester.py --out results.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import itertools
import os
import pkgutil
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import lightning_attn.metrics  # noqa: E402
from lightning_attn.metrics import (  # noqa: E402
    ActivationStatistics,
    AttentionPositions,
    AttentionStatistics,
    CalibrationMetric,
    FeatureCorrelation,
    HeadTypeScores,
    ModalityAgreement,
    WeightHistogram,
)
from lightning_attn.metrics.importance import HeadImportance  # noqa: E402

Data = dict[str, Tensor]  # batch-first tensors: a batch is a slice of every one along dim 0


def metric_classes() -> list[type[Metric]]:
    """Every concrete ``Metric`` subclass defined in a module of :mod:`lightning_attn.metrics`, by name."""
    found: dict[str, type[Metric]] = {}
    for info in pkgutil.iter_modules(lightning_attn.metrics.__path__, "lightning_attn.metrics."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Metric) and cls.__module__ == module.__name__ and not inspect.isabstract(cls):
                found[cls.__name__] = cls
    return [found[name] for name in sorted(found)]


@dataclasses.dataclass
class Case:
    """How to test one Metric class: ``make(**kwargs)`` builds one (``kwargs`` for torchmetrics, e.g.
    ``sync_on_compute``), ``data(generator)`` draws a data set, ``feed(metric, batch)`` updates with one batch, and
    ``reference(data)`` (optional) gives the expected ``compute()`` of the whole set in float64."""

    make: Callable[..., Metric]
    data: Callable[[torch.Generator], Data]
    feed: Callable[[Metric, Data], None]
    reference: Callable[[Data], Any] | None = None


def _probs(generator: torch.Generator, shape: tuple[int, ...], sharpness: float = 3.0) -> Tensor:
    return torch.softmax(sharpness * torch.randn(shape, generator=generator), -1)


# -- references, float64 and eager ----------------------------------------------------------------------------
def _row_max_reference(data: Data) -> dict[str, dict[str, Tensor]]:
    out = {}
    for site in ("a", "b"):
        rows = data[site].double().amax(-1)  # [N, H, Q]
        out[site] = {
            "mean": {"max": rows.mean((0, 2))},
            "std": {"max": rows.std((0, 2), unbiased=False)},
            "rows": torch.full((rows.shape[1],), rows.shape[0] * rows.shape[2], dtype=torch.float64),
        }
    return out


def _positions_reference(data: Data) -> dict[str, tuple[Tensor, Tensor]]:
    p = data["a"].double()  # [N, H, L, L]
    received = p.sum((0, 1, 2)) / (p.shape[0] * p.shape[1] * p.shape[2])
    given = 1 - p.diagonal(dim1=-2, dim2=-1).mean((0, 1))
    return {"a": (received, given)}


def _agreement_reference(data: Data) -> dict[str, Tensor]:
    a, b = data["a_to_b"].double(), data["b_to_a"].double().transpose(1, 2)
    values = [torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1] for x, y in zip(a, b, strict=True)]
    return {"pair": torch.stack(values).mean()}


def _calibration_reference(data: Data) -> dict[str, Tensor]:
    probs = torch.softmax(data["logits"].double(), 1)
    target = data["target"]
    confidence, prediction = probs.max(1)
    correct = (prediction == target).double()
    bins = (confidence * 5).floor().clamp(max=4).long()
    ece = sum(
        (bins == m).double().mean() * (correct[bins == m].mean() - confidence[bins == m].mean()).abs()
        for m in range(5)
        if (bins == m).any()
    )
    one_hot = torch.nn.functional.one_hot(target, 4).double()
    return {
        "ece": torch.as_tensor(ece),
        "accuracy": correct.mean(),
        "brier": ((probs - one_hot) ** 2).sum(1).mean(),
        "nll": -probs.gather(1, target[:, None]).log().mean(),
    }


def _head_types_reference(data: Data) -> dict[str, Tensor]:
    p = data["a"].double()
    previous = p.diagonal(offset=-1, dim1=-2, dim2=-1).sum((0, 2)) / p.sum((0, 2, 3))
    tokens = data["tokens"]
    same = (tokens[:, :, None] == tokens[:, None, :]).tril(-1).double()  # duplicate: tok_i == tok_j, j < i
    duplicate = (p * same[:, None]).sum((0, 2, 3)) / p.sum((0, 2, 3))
    shifted = torch.roll(same, shifts=1, dims=2)  # TransformerLens: tok_i == tok_{j-1}, column 0 zero, then tril
    shifted[:, :, 0] = 0
    induction = (p * shifted.tril()[:, None]).sum((0, 2, 3)) / p.sum((0, 2, 3))
    return {"a": torch.stack([previous, duplicate, induction])}


def _correlation_reference(data: Data) -> dict[str, Tensor]:
    x, y = data["x"].double(), data["y"].double()
    return {"a": torch.stack([torch.corrcoef(torch.stack([x[:, h], y]))[0, 1] for h in range(x.shape[1])])[None]}


def _activation_reference(data: Data) -> dict[str, dict[str, Tensor]]:
    x = data["x"].double()  # [N, L, C]
    return {
        "a": {
            "channel_mean": x.mean((0, 1)),
            "channel_std": x.std((0, 1), unbiased=False),
            "position_mean": x.mean((0, 2)),
        }
    }


def _histogram_reference(data: Data) -> dict[str, Tensor]:
    p = data["a"].double()  # [N, H, Q, K]
    index = (p * 5).floor().clamp(max=4).long()
    return {"a": torch.stack([torch.bincount(index[:, h].flatten(), minlength=5).double() for h in range(p.shape[1])])}


def _importance_reference(data: Data) -> dict[str, Tensor]:
    return {"a": data["grad"].double().abs().mean(0)}


# -- the cases --------------------------------------------------------------------------------------------------
def _two_sites(generator: torch.Generator) -> Data:
    return {"a": _probs(generator, (12, 2, 5, 5)), "b": _probs(generator, (12, 3, 4, 7))}


def _one_map(generator: torch.Generator) -> Data:
    return {"a": _probs(generator, (12, 2, 6, 6)), "tokens": torch.randint(0, 3, (12, 6), generator=generator)}


def _correlated(generator: torch.Generator) -> Data:
    """Three heads: uncorrelated with the feature, positively, negatively (plus noise)."""
    y = torch.randn(12, generator=generator)
    return {"x": torch.randn(12, 3, generator=generator) + y[:, None] * torch.tensor([0.0, 1.0, -2.0]), "y": y}


CASES: dict[str, Case] = {
    "ActivationStatistics": Case(
        make=lambda **kw: ActivationStatistics(max_positions=8, **kw),
        data=lambda g: {"x": torch.rand(12, 5, 3, generator=g)},
        feed=lambda m, d: m.update("a", d["x"]),
        reference=_activation_reference,
    ),
    "AttentionPositions": Case(
        make=lambda **kw: AttentionPositions(max_positions=16, **kw),
        data=_one_map,
        feed=lambda m, d: m.update("a", d["a"]),
        reference=_positions_reference,
    ),
    "AttentionStatistics": Case(
        make=lambda **kw: AttentionStatistics({"max": lambda p, offset: p.amax(-1)}, chunk_size=2, **kw),
        data=_two_sites,
        feed=lambda m, d: (m.update("a", d["a"]), m.update("b", d["b"])),  # type: ignore[func-returns-value]
        reference=_row_max_reference,
    ),
    "CalibrationMetric": Case(
        make=lambda **kw: CalibrationMetric("multiclass", 4, n_bins=5, fine_bins=100, bootstrap=4, **kw),
        data=lambda g: {
            "logits": 2 * torch.randn(40, 4, generator=g),
            "target": torch.randint(0, 4, (40,), generator=g),
        },
        feed=lambda m, d: m.update(d["logits"], d["target"]),
        reference=_calibration_reference,
    ),
    "FeatureCorrelation": Case(
        make=lambda **kw: FeatureCorrelation(["f"], **kw),
        data=_correlated,
        feed=lambda m, d: m.update("a", "f", d["x"], d["y"]),
        reference=_correlation_reference,
    ),
    "HeadImportance": Case(
        make=lambda **kw: HeadImportance(**kw),
        data=lambda g: {"grad": torch.randn(12, 4, generator=g)},
        feed=lambda m, d: m.update("a", d["grad"]),
        reference=_importance_reference,
    ),
    "HeadTypeScores": Case(
        make=lambda **kw: HeadTypeScores(**kw),
        data=_one_map,
        feed=lambda m, d: m.update("a", d["a"], tokens=d["tokens"]),
        reference=_head_types_reference,
    ),
    "ModalityAgreement": Case(
        make=lambda **kw: ModalityAgreement(**kw),
        data=lambda g: {"a_to_b": _probs(g, (12, 4, 3)), "b_to_a": _probs(g, (12, 3, 4))},
        feed=lambda m, d: m.update("pair", d["a_to_b"], d["b_to_a"]),
        reference=_agreement_reference,
    ),
    "WeightHistogram": Case(
        make=lambda **kw: WeightHistogram(bins=5, **kw),
        data=lambda g: {"a": _probs(g, (12, 2, 3, 4))},
        feed=lambda m, d: m.update("a", d["a"], key_mask=None),
        reference=_histogram_reference,
    ),
}


# -- the checks -------------------------------------------------------------------------------------------------
def dataset(name: str, seed: int = 0) -> Data:
    return CASES[name].data(torch.Generator().manual_seed(seed))


def split(data: Data, parts: int) -> list[Data]:
    """``parts`` contiguous batches of uneven sizes (the first one sample)."""
    size = next(iter(data.values())).shape[0]
    cuts = [0, 1, *(1 + round(k * (size - 1) / (parts - 1)) for k in range(1, parts))]
    return [{k: v[lo:hi] for k, v in data.items()} for lo, hi in itertools.pairwise(cuts) if hi > lo]


def computed(name: str, batches: list[Data], **kwargs: Any) -> dict[str, Tensor]:
    """``compute()`` of a fresh metric fed ``batches``, flattened to ``{path: float64 tensor}``."""
    metric = CASES[name].make(**kwargs)
    for batch in batches:
        CASES[name].feed(metric, batch)
    return flatten(metric.compute())


def flatten(value: Any, prefix: str = "") -> dict[str, Tensor]:
    """Tensors, numbers, dicts, sequences and dataclasses to ``{path: float64 tensor}``."""
    if isinstance(value, Tensor):
        return {prefix: value.detach().to("cpu", torch.float64)}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: torch.tensor(float(value), dtype=torch.float64)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}/{i}").items()}
    return {}


def assert_close(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float = 1e-6, atol: float = 1e-8) -> None:
    """Every path of ``want`` in ``got``, equal (NaN where NaN) to the rounding of the metrics, which reduce each
    batch in float32 before adding it to their float64 sums."""
    missing = sorted(set(want) - set(got))
    assert not missing, f"missing outputs {missing}"
    for path, expected in want.items():
        torch.testing.assert_close(
            got[path], expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m, p=path: f"{p}: {m}"
        )


def state_size(metric: Metric) -> int:
    """Elements in every state of ``metric`` (list states count their elements too)."""
    total = 0
    for name in metric._defaults:
        state = getattr(metric, name)
        items = state if isinstance(state, list) else [state]
        total += sum(item.numel() for item in items)
    return total


def sizes_after(name: str, counts: tuple[int, ...]) -> list[int]:
    """State sizes of one metric after each of ``counts`` batches in total (the same small batch, repeated)."""
    case = CASES[name]
    batch = split(dataset(name), 4)[1]
    metric = case.make()
    sizes, fed = [], 0
    for count in counts:
        while fed < count:
            case.feed(metric, batch)
            fed += 1
        sizes.append(state_size(metric))
    return sizes


# -- the DDP script ---------------------------------------------------------------------------------------------
def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for name in CASES:
            data = dataset(name)
            size = next(iter(data.values())).shape[0]
            shard = {k: v[: size // 2] if rank == 0 else v[size // 2 :] for k, v in data.items()}
            results[name] = computed(name, split(shard, 3))
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # fork: the ranks inherit the imports (a spawned rank would import torch and lightning_attn again)
    torch.multiprocessing.start_processes(_rank, args=(port, arguments.out), nprocs=2, join=True, start_method="fork")


if __name__ == "__main__":
    main()
