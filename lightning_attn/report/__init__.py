"""Post-hoc explainability reports: per-sample explanations, saliency, HTML/JSON/CSV/Markdown with provenance.

- :class:`ExplainabilityReport`: the Lightning callback (test loop; validation when asked);
- :func:`build_report`: the same on a model and a dataloader, without a Trainer script;
- ``lightning-attn report`` (:mod:`lightning_attn.report.cli`): the same from a checkpoint and a config;
- :func:`schema_path`: the JSON Schema of ``report.json`` shipped with the package;
- :func:`explorer_data` and :func:`write_explorer`: the interactive attention explorer as a standalone page (the
  report also writes its own probes' explorer as ``explorer.html``, fit for ``wandb.Html``).
"""

from __future__ import annotations

from pathlib import Path

from lightning_attn.report.build import build_report
from lightning_attn.report.callback import SCHEMA_VERSION, ExplainabilityReport
from lightning_attn.report.explain import ReportError, default_forward
from lightning_attn.report.explorer import explorer_data, write_explorer
from lightning_attn.report.provenance import StreamHasher, hash_config, hash_state_dict

__all__ = [
    "SCHEMA_VERSION",
    "ExplainabilityReport",
    "ReportError",
    "StreamHasher",
    "build_report",
    "default_forward",
    "explorer_data",
    "hash_config",
    "hash_state_dict",
    "load_schema",
    "schema_path",
    "write_explorer",
]


def schema_path() -> Path:
    """Path of ``report.schema.json`` (JSON Schema, draft 2020-12) inside the installed package."""
    return Path(__file__).with_name("report.schema.json")


def load_schema() -> dict:
    """The JSON Schema of ``report.json`` as a dict."""
    import json

    return json.loads(schema_path().read_text(encoding="utf-8"))
