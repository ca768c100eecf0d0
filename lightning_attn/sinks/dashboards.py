"""What the dashboards get once per run rather than every epoch (global rank zero only):

- :func:`publish_config`: a callback's ``__init__`` arguments into the W&B run config, as
  ``lightning_attn/<callback name>/<argument>``, so that runs can be compared and filtered by them;
- :func:`publish_report`: a finished explainability report as ``wandb.Html`` under ``report/<stage>``, its
  attention explorer under ``report/<stage>/explorer`` and its folder as a W&B artifact of type
  ``explainability-report``;
- :func:`publish_scalar_layout`: a TensorBoard custom-scalars layout (one multiline chart per group of tags);
- :func:`announce_outputs`: one console line saying where a callback's outputs went.
"""

from __future__ import annotations

import inspect
import re
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from lightning_attn.sinks import _is_tensorboard, _is_wandb, _loggers, to_jsonable

__all__ = [
    "REPORT_ARTIFACT_TYPE",
    "announce_outputs",
    "init_arguments",
    "per_head_charts",
    "publish_config",
    "publish_report",
    "publish_scalar_layout",
]

#: W&B artifact type of a report folder.
REPORT_ARTIFACT_TYPE = "explainability-report"
#: The custom-scalars charts of each Trainer so far: TensorBoard keeps one layout per run, so every write holds all.
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[Any]]]] = weakref.WeakKeyDictionary()


def init_arguments(callback: Any) -> dict[str, Any]:
    """The callback's ``__init__`` arguments as it holds them (the attribute of the same name), in plain JSON types;
    arguments it keeps under another name are left out, objects (callables, modules) are given by their ``repr``."""
    arguments: dict[str, Any] = {}
    for name, parameter in inspect.signature(type(callback).__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if not hasattr(callback, name):
            continue
        value = to_jsonable(getattr(callback, name))
        if not isinstance(value, (str, int, float, bool, list, dict, type(None))):
            value = repr(value)
        arguments[name] = value
    return arguments


def publish_config(trainer: Any, name: str, callback: Any) -> None:
    """``lightning_attn/<name>/<argument>`` of every init argument (:func:`init_arguments`) into each W&B run's
    config (rank zero). A repeated call (``fit`` then ``test``) updates the values."""
    if not getattr(trainer, "is_global_zero", True):
        return
    loggers = [logger for logger in _loggers(trainer) if _is_wandb(logger)]
    if not loggers:
        return
    config = {f"lightning_attn/{name}/{key}": value for key, value in init_arguments(callback).items()}
    for logger in loggers:
        logger.experiment.config.update(config, allow_val_change=True)


def publish_report(trainer: Any, directory: Path, stage: str, step: int) -> None:
    """A finished report folder to W&B (rank zero): its ``report.html`` as ``wandb.Html`` under ``report/<stage>``,
    its ``explorer.html`` (when the probes had attention maps) under ``report/<stage>/explorer``, and the whole folder
    (both pages included) as an artifact ``report-<stage>`` of type :data:`REPORT_ARTIFACT_TYPE`."""
    if not getattr(trainer, "is_global_zero", True):
        return
    loggers = [logger for logger in _loggers(trainer) if _is_wandb(logger)]
    if not loggers:
        return
    import wandb  # only with a W&B logger, which imported it already

    pages = {
        key: wandb.Html(path.read_text(encoding="utf-8"))
        for key, path in (
            (f"report/{stage}", directory / "report.html"),
            (f"report/{stage}/explorer", directory / "explorer.html"),
        )
        if path.is_file()
    }
    for logger in loggers:
        if pages:  # through Lightning's log_metrics, which keeps W&B's step and trainer/global_step in order
            logger.log_metrics(pages, step=step)
        artifact = wandb.Artifact(
            re.sub(r"[^A-Za-z0-9_.-]+", "-", f"report-{stage}"),
            type=REPORT_ARTIFACT_TYPE,
            description=f"lightning_attn explainability report ({stage}): {directory.name}",
        )
        artifact.add_dir(str(directory))
        logger.experiment.log_artifact(artifact)


def publish_scalar_layout(trainer: Any, category: str, charts: Mapping[str, Sequence[str]]) -> None:
    """A TensorBoard custom-scalars layout (rank zero): under ``category``, one multiline chart per entry of
    ``charts`` (chart title -> exact tags), e.g. every head of one site and statistic in one chart. TensorBoard keeps
    one layout per run (the last written), so the charts of every call for this Trainer are written together."""
    if not getattr(trainer, "is_global_zero", True) or not charts:
        return
    layout = _LAYOUTS.setdefault(trainer, {})
    new = {title: ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]] for title, tags in charts.items()}
    if all(layout.get(category, {}).get(title) == chart for title, chart in new.items()):
        return  # written already
    layout.setdefault(category, {}).update(new)
    for logger in _loggers(trainer):
        if _is_tensorboard(logger):
            logger.experiment.add_custom_scalars(layout)


def per_head_charts(keys: Sequence[str]) -> dict[str, list[str]]:
    """Per-head keys ``<prefix>/h<k>/<statistic>`` grouped into one chart per ``<prefix>/<statistic>`` (one site's
    heads in one multiline chart), heads in order; other keys are left out.

    >>> per_head_charts(["attn/val/l0/h1/entropy", "attn/val/l0/h0/entropy", "attn/val/l0/entropy"])
    {'attn/val/l0/entropy': ['attn/val/l0/h0/entropy', 'attn/val/l0/h1/entropy']}
    """
    charts: dict[str, list[tuple[int, str]]] = {}
    for key in keys:
        match = re.fullmatch(r"(.+)/h(\d+)/([^/]+)", key)
        if match:
            charts.setdefault(f"{match.group(1)}/{match.group(3)}", []).append((int(match.group(2)), key))
    return {title: [key for _, key in sorted(heads)] for title, heads in charts.items()}


def announce_outputs(trainer: Any, name: str, directory: Path, report: Path | None = None) -> None:
    """One console line (rank zero): where the outputs of callback ``name`` went, and its report when it wrote one."""
    if not getattr(trainer, "is_global_zero", True):
        return
    line = f"lightning_attn: {name} outputs in {directory}"
    if report is not None:
        line += f"; report {report / 'report.html'}"
    rank_zero_info(line)
