"""Loggers for the command line: TensorBoard by default, Weights & Biases on request, never a prompt.

Both are thin subclasses of Lightning's loggers (same class names, so every sink recognizes them) that
add two things a YAML file cannot express:

- ``save_dir=None`` means "the run's directory": :mod:`lightning_attn.cli` fills it with
  ``trainer.default_root_dir`` (``.`` outside the CLI), so one logger config serves every example;
- :class:`WandbLogger` decides online versus offline itself (``offline=None``): online only when
  credentials exist (``WANDB_API_KEY`` set, or an ``api.wandb.ai`` entry in ``~/.netrc``, which is
  where ``wandb login`` stores the key) and ``WANDB_MODE`` does not say ``offline``/``disabled``.
  Asking for online without credentials falls back to offline with a warning instead of the
  interactive login prompt. ``wandb sync <dir>`` uploads an offline run later.

Usage::

    python -m lightning_attn.cli fit --config configs/digits_vit.yaml --config configs/loggers/wandb.yaml

or in Python ``wandb_logger(project="my-project")``.
"""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger

__all__ = ["TensorBoardLogger", "WandbLogger", "has_wandb_credentials", "resolve_wandb_offline", "wandb_logger"]


def _wandb_host() -> str:
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    return urlparse(base).hostname or "api.wandb.ai"


def has_wandb_credentials() -> bool:
    """Whether W&B can log in without asking: ``WANDB_API_KEY`` is set, or the netrc file (``$NETRC`` or
    ``~/.netrc``) holds a password for the W&B host (``WANDB_BASE_URL``, default ``api.wandb.ai``)."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(_wandb_host())
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_offline(offline: bool | None) -> bool:
    """The offline flag to use: ``None`` = offline unless credentials exist and ``WANDB_MODE`` allows
    online; ``False`` without credentials = offline with a warning (never the interactive prompt)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if offline is None:
        return mode in ("offline", "dryrun", "disabled") or not has_wandb_credentials()
    if not offline and not has_wandb_credentials():
        warnings.warn(
            "W&B online logging was requested but no API key was found (WANDB_API_KEY unset, no api.wandb.ai entry "
            "in ~/.netrc): logging offline instead. Run `wandb login` or set WANDB_API_KEY, or upload later with "
            "`wandb sync <save_dir>/wandb/offline-run-*`.",
            UserWarning,
            stacklevel=3,
        )
        return True
    return bool(offline)


class TensorBoardLogger(_TensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` whose ``save_dir`` defaults to the run's directory.

    Args:
        save_dir: root directory of the logs; ``None``: ``trainer.default_root_dir`` under
            :mod:`lightning_attn.cli`, else the working directory.
        name: experiment name, a sub-directory of ``save_dir``.
        version: run version (``None``: the next free ``version_<n>``).
        log_graph: add the model graph to TensorBoard.
        default_hp_metric: log a placeholder ``hp_metric``.
        prefix: prefix of every metric key.
        sub_dir: sub-directory of the version directory for the event files.
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str | None = "tensorboard",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = False,
        prefix: str = "",
        sub_dir: str | None = None,
    ) -> None:
        super().__init__(
            save_dir=save_dir or ".",
            name=name,
            version=version,
            log_graph=log_graph,
            default_hp_metric=default_hp_metric,
            prefix=prefix,
            sub_dir=sub_dir,
        )


class WandbLogger(_WandbLogger):
    """Lightning's ``WandbLogger`` that picks offline mode by itself and never prompts for a key.

    Args:
        project: W&B project.
        name: display name of the run (``None``: W&B picks one).
        save_dir: directory of the local run files (``<save_dir>/wandb/...``); ``None``:
            ``trainer.default_root_dir`` under :mod:`lightning_attn.cli`, else the working directory.
        offline: ``None`` = online when credentials exist (``WANDB_API_KEY`` or ``~/.netrc``), else offline;
            ``True`` = offline; ``False`` = online, falling back to offline with a warning without credentials.
        log_model: upload checkpoints as W&B artifacts (``"all"``: every checkpoint; ignored offline).
        tags: run tags.
        group: run group.
        entity: W&B team or user.
        kwargs: further ``wandb.init`` arguments.
    """

    def __init__(
        self,
        project: str = "lightning-attn",
        name: str | None = None,
        save_dir: str | None = None,
        offline: bool | None = None,
        log_model: bool | Literal["all"] = False,
        tags: list[str] | None = None,
        group: str | None = None,
        entity: str | None = None,
        **kwargs: Any,
    ) -> None:
        resolved = resolve_wandb_offline(offline)
        os.environ.setdefault("WANDB_SILENT", "true")
        extra: dict[str, Any] = {
            k: v for k, v in {"tags": tags, "group": group, "entity": entity}.items() if v is not None
        }
        super().__init__(
            project=project,
            name=name,
            save_dir=save_dir or ".",
            offline=resolved,
            log_model=False if resolved else log_model,
            **extra,
            **kwargs,
        )
        self.resolved_offline = resolved


def wandb_logger(project: str = "lightning-attn", offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A :class:`WandbLogger`, offline unless W&B credentials exist (see :func:`resolve_wandb_offline`)."""
    return WandbLogger(project=project, offline=offline, **kwargs)
