"""The HeadSpecializationTracker's per-epoch records: one analysed epoch made from the computed metrics, its logged
scalars and published tables, and the history of records kept in the callback's ``state_dict``.

A record is plain Python values (lists of floats, NaN where undefined), so that it survives ``state_dict``:
``stage``, ``epoch``, ``global_step``, ``coverage``, ``sites``, ``rows``, ``statistics``, ``type_scores``,
``correlations``, ``clusters``, the analysis of :func:`~lightning_attn.metrics.head_labels.analyze_heads` (``hsi``,
``primary_feature``, ``correlation``, ``types``, ``labels``, ``descriptions``), ``importance`` and
``importance_normalized`` with head importance, and the role-change ``events`` since the stage's previous record.

What the tracker measures. Attention is captured with :class:`~lightning_attn.AttentionRecorder` (any
``nn.MultiheadAttention``, ``scaled_dot_product_attention`` call or weight-returning module), reduced in query
chunks and streamed into sum-reduced torchmetrics states, so that results over DDP ranks equal one process over the
same samples. Per head ``h`` of every site (a *layer* of the registry), per evaluated epoch:

**Row statistics** (mean over every (sample, query) row of the epoch;
:func:`~lightning_attn.metrics.heads.head_statistics_reducers`): ``entropy`` (normalized, ``H_i / log n_i``),
``confidence`` (Voita et al. 2019: ``max_j A_ij``, keys in ``confidence_exclude_positions`` /
``confidence_exclude_key`` left out), ``distance`` (``sum_j A_ij |i - j|``), ``first_token`` (``A_i0``),
``self``, ``previous``, ``next`` (``A_{i,i}``, ``A_{i,i-1}``, ``A_{i,i+1}``) and ``local``
(``sum_{|i-j| <= local_window} A_ij``).

**Head-type scores**: TransformerLens ``head_detector`` ``mul`` scores ``sum(A * P) / sum(A)``, with numerator
and denominator each summed over all samples of the epoch, for the previous-token pattern and, when the batch
carries token ids under ``token_ids_key``, the duplicate-token and induction patterns (self-attention sites
only); plus ``sink`` (= mean first-token mass) and ``broad`` (= mean normalized entropy). A head *is* of a type
when its score reaches the type's threshold.

**Redundancy**: pairwise Jensen-Shannon divergence between heads (Clark et al. 2019, smoothing
``0.001/n + 0.999 A``, averaged over query rows and probe samples), on the probe samples: the first
``probe_samples`` samples of the first batch of dataloader 0 on global rank zero (as
:class:`~lightning_attn.AttentionLogger`), maps block-pooled to ``probe_max_tokens``. Heads of sites of equal
shape are compared, across layers too. Clusters: connected components of ``JS <= redundancy_threshold``.
Under DDP the clusters are rank zero's (the streamed measures are global).

**Semantic features** (Head Specialization Index): ``features`` names per-sample values taken from each batch
(``{"ttc": "ttc", "distance": "dist"}``: feature name -> batch key, dotted path or callable). For each head
and feature, the epoch's Pearson correlation ``corr_f`` between the head's per-sample *summary* and the
feature, over all samples (sums of ``x, y, x^2, y^2, xy, n`` streamed). The summary (``summary``): the
attention mass on the feature's key tokens when ``feature_masks`` gives a ``[B, K]`` mask for it, else the
head's per-sample mean confidence (``max_j A_ij`` averaged over rows); ``"entropy"`` uses the mean normalized
entropy. A feature of shape ``[B, K]`` is per key token: the attention each token receives is paired with its
value. ``HSI = max_f |corr_f|``, ``primary feature = argmax``; undefined correlations (constant summary or
feature) are skipped.

**Labels**: ``HSI >= hsi_threshold`` gives the primary feature's label from ``feature_labels`` (merged over
:data:`~lightning_attn.metrics.driving.DEFAULT_FEATURE_LABELS`: ``ttc`` -> *Safety Head* (expected sign -),
``distance`` -> *Proximity Head* (-), ``closing_speed`` -> *Threat Assessment* (+), ``is_ahead`` ->
*Traffic Flow* (+), ``is_left``/``is_right`` -> *Lane Awareness* (+); ``" (inverted)"`` when the sign is the
opposite); else the first structural type reached, in the order induction, duplicate-token, previous-token,
sink, broad; else *General context*.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_attn.metrics.coverage import coverage_record
from lightning_attn.metrics.driving import DEFAULT_FEATURE_LABELS
from lightning_attn.metrics.head_labels import GENERAL_LABEL, FeatureLabel, analyze_heads
from lightning_attn.metrics.head_roles import (
    EVENT_COLUMNS,
    PRUNABLE_COLUMNS,
    add_head_history,
    event_rows,
    importance_record,
    previous_record,
    prunable_heads,
    role_events,
)
from lightning_attn.metrics.head_types import TYPE_SCORES
from lightning_attn.metrics.heads import HEAD_STATISTICS
from lightning_attn.metrics.registry import build_registry, registry_table

__all__ = [
    "HISTORY_VERSION",
    "LOGGABLE_SCORES",
    "HeadHistory",
    "epoch_record",
    "head_scalars",
    "merged_feature_labels",
    "record_tables",
]

#: Names accepted in the tracker's ``logged_scores``.
LOGGABLE_SCORES: tuple[str, ...] = (*HEAD_STATISTICS, *TYPE_SCORES, "sink", "broad", "hsi")

#: Bump when the layout of a history record changes. 2: the features are saved with the history.
HISTORY_VERSION = 2

#: One published table: its columns and rows.
Table = tuple[Sequence[str], list[list[Any]]]


def merged_feature_labels(overrides: Mapping[str, Sequence[Any]] | None) -> dict[str, FeatureLabel]:
    """:data:`~lightning_attn.metrics.driving.DEFAULT_FEATURE_LABELS` with ``overrides`` (feature name ->
    ``(label, description, expected sign)``) on top.

    Raises:
        ValueError: for an expected sign other than -1, 0 or 1.
    """
    labels = dict(DEFAULT_FEATURE_LABELS)
    for name, value in (overrides or {}).items():
        label = FeatureLabel(*value)
        if label.expected_sign not in (-1, 0, 1):
            raise ValueError(f"feature_labels[{name!r}]: expected sign must be -1, 0 or 1, got {label.expected_sign}")
        labels[name] = label
    return labels


def epoch_record(
    computed: dict[str, Any],
    *,
    stage: str,
    epoch: int,
    global_step: int,
    coverage: Mapping[str, int],
    hsi_threshold: float,
    thresholds: Mapping[str, float],
    feature_labels: Mapping[str, FeatureLabel],
    importance: Mapping[str, Tensor] | None,
    history: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The record of one evaluated epoch of ``stage`` (a stage key: ``val``, ``test_dl1`` ...), made in place from
    ``computed`` (:meth:`~lightning_attn.metrics.heads.HeadSpecializationMetrics.compute`), and the probe's
    redundancy result taken out of it (``None`` without probe maps).

    Args:
        computed: the epoch's computed measures; becomes the record.
        stage: the stage key.
        epoch: the epoch evaluated.
        global_step: the optimizer step at the evaluation.
        coverage: the batches recorded and seen (:mod:`lightning_attn.callbacks.budget`); the record's ``coverage``
            adds the rows of each site (:func:`~lightning_attn.metrics.coverage.coverage_record`).
        hsi_threshold: minimum HSI for a feature label, and the side an HSI crossing makes an event.
        thresholds: structural type -> minimum score.
        feature_labels: feature name -> its label.
        importance: site -> ``[H]`` raw head importance (``None``: no head importance this epoch).
        history: the earlier records of ``stage``, whose latest before ``epoch`` the role events compare with.
    """
    redundancy = computed.pop("redundancy", None)
    computed.update(stage=stage, epoch=epoch, global_step=global_step)
    computed["coverage"] = coverage_record(coverage, computed["rows"])
    computed["clusters"] = list(redundancy["clusters"]) if redundancy else []
    analyze_heads(computed, hsi_threshold=hsi_threshold, thresholds=thresholds, feature_labels=feature_labels)
    if importance is not None:
        computed.update(importance_record(importance, computed["sites"]))
    computed["events"] = role_events(previous_record(history, epoch), computed, hsi_threshold)
    return computed, redundancy


def head_score(record: Mapping[str, Any], site: str, head: int, score: str) -> float | None:
    """One head's ``score`` in ``record``: ``hsi``, a row statistic or a type score."""
    if score == "hsi":
        return record["hsi"][site][head]
    if score in record["statistics"][site]:
        return record["statistics"][site][score][head]
    return record["type_scores"][site][score][head]


def head_scalars(
    record: Mapping[str, Any],
    namespace: str,
    logged_scores: Sequence[str],
    *,
    log_per_head: bool,
    hsi_threshold: float,
    with_features: bool,
) -> dict[str, float]:
    """The logged scalars of ``record``: ``<namespace>/<stage>/<score>``, the mean of each of ``logged_scores`` over
    every head of the model (finite values only), with ``log_per_head`` also
    ``<namespace>/<stage>/<site>/h<k>/<score>``;
    ``<namespace>/<stage>/specialized`` (heads with ``HSI >= hsi_threshold``, ``with_features`` only) and
    ``<namespace>/<stage>/general`` (heads labelled *General context*)."""
    scalars: dict[str, float] = {}
    prefix = f"{namespace}/{record['stage']}"
    specialized = general = 0
    # without per-head scalars, one mean over every head of the model: the per-site view of the same measures is
    # AttentionLogger's (site-level scalars), the per-head one the registry table and figures
    per_score: dict[str, list[float]] = {score: [] for score in logged_scores}
    for site_info in record["sites"]:
        site = site_info["name"]
        for h in range(site_info["num_heads"]):
            hsi = record["hsi"][site][h]
            specialized += int(hsi is not None and hsi >= hsi_threshold)
            general += int(record["labels"][site][h] == GENERAL_LABEL[0])
            for score in logged_scores:
                value = head_score(record, site, h, score)
                if value is not None and math.isfinite(value):
                    per_score[score].append(float(value))
                    if log_per_head:
                        scalars[f"{prefix}/{site}/h{h}/{score}"] = float(value)
    for score, values in per_score.items():
        if values:
            scalars[f"{prefix}/{score}"] = sum(values) / len(values)
    if with_features:
        scalars[f"{prefix}/specialized"] = float(specialized)
    scalars[f"{prefix}/general"] = float(general)
    return scalars


def record_tables(record: Mapping[str, Any], registry: dict[str, Any] | None) -> dict[str, Table]:
    """The tables published for ``record``, in order: ``registry`` (one row per head, given the ``registry``),
    ``role_events`` and, with head importance, ``prunable_heads``."""
    tables: dict[str, Table] = {}
    if registry is not None:
        tables["registry"] = registry_table(registry)
    tables["role_events"] = (EVENT_COLUMNS, event_rows(record["events"]))
    if "importance" in record:
        tables["prunable_heads"] = (PRUNABLE_COLUMNS, prunable_heads(record))
    return tables


class HeadHistory:
    """The records of every evaluated epoch, oldest first; re-evaluating an epoch of a stage replaces its record.

    Example:
        >>> history = HeadHistory()
        >>> history.add({"stage": "val", "epoch": 0, "events": []})
        >>> history.add({"stage": "val", "epoch": 0, "events": [{"head": "a/h0"}]})
        >>> len(history.records), history.events("val")
        (1, [{'head': 'a/h0'}])
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        """Append ``record``, replacing one of the same stage and epoch (a re-run epoch, a resumed run)."""
        self.records = [
            r for r in self.records if not (r["stage"] == record["stage"] and r["epoch"] == record["epoch"])
        ]
        self.records.append(record)

    def for_stage(self, stage: str) -> list[dict[str, Any]]:
        """The records of one stage key, oldest first."""
        return [record for record in self.records if record["stage"] == stage]

    def events(self, stage: str) -> list[dict[str, Any]]:
        """The head-role changes of one stage key, oldest first."""
        return [event for record in self.for_stage(stage) for event in record.get("events", [])]

    def registry(
        self,
        stage: str,
        *,
        hsi_threshold: float,
        thresholds: Mapping[str, float],
        feature_labels: Mapping[str, FeatureLabel],
        features: Sequence[str],
        summary: str,
    ) -> dict[str, Any]:
        """The head-function registry of the latest record of ``stage``
        (:func:`~lightning_attn.metrics.registry.build_registry`), each head with its ``label_history``.

        Raises:
            LookupError: when nothing was recorded for ``stage`` yet.
        """
        records = self.for_stage(stage)
        if not records:
            have = sorted({r["stage"] for r in self.records})
            raise LookupError(f"no head-specialization record for stage {stage!r} yet (have {have})")
        registry = build_registry(
            records[-1],
            hsi_threshold=hsi_threshold,
            thresholds=thresholds,
            feature_labels=feature_labels,
            features=features,
            summary=summary,
        )
        return add_head_history(registry, records)

    def state_dict(self, features: Sequence[str]) -> dict[str, Any]:
        """The records (plain Python values) and the ``features`` they were computed with."""
        return {"version": HISTORY_VERSION, "features": sorted(features), "history": [dict(r) for r in self.records]}

    def load_state_dict(self, state_dict: Mapping[str, Any], features: Sequence[str]) -> list[str] | None:
        """Continue the history of ``state_dict``; when it was computed with other features than ``features`` its
        correlations, HSI and labels do not compare: start again and return the saved features (else ``None``)."""
        saved = state_dict.get("features", sorted(features))
        if saved != sorted(features):
            self.records = []
            return list(saved)
        self.records = [dict(record) for record in state_dict.get("history", [])]
        return None
