"""Streaming torchmetrics ``Metric`` objects: fixed-size, sum-reduced states, no host sync in ``update``."""

from lightning_attn.metrics.attention import (
    AttentionPositions,
    AttentionResults,
    AttentionStatistics,
    ModalityAgreement,
    ProbeMaps,
    default_reducers,
)
from lightning_attn.metrics.calibration import CalibrationMetric
from lightning_attn.metrics.heads import (
    FeatureCorrelation,
    HeadSpecializationMetrics,
    HeadTypeScores,
    ProbeHeadMaps,
    head_statistics_reducers,
)
from lightning_attn.metrics.probe_results import ProbeResults
from lightning_attn.metrics.probes import (
    ActivationStatistics,
    ProbeStatistics,
    WeightHistogram,
)
from lightning_attn.metrics.reservoir import LogitReservoir

__all__ = [
    "ActivationStatistics",
    "AttentionPositions",
    "AttentionResults",
    "AttentionStatistics",
    "CalibrationMetric",
    "FeatureCorrelation",
    "HeadSpecializationMetrics",
    "HeadTypeScores",
    "LogitReservoir",
    "ModalityAgreement",
    "ProbeHeadMaps",
    "ProbeMaps",
    "ProbeResults",
    "ProbeStatistics",
    "WeightHistogram",
    "default_reducers",
    "head_statistics_reducers",
]
