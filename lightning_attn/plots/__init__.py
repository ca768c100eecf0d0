"""Figures: data in, ``matplotlib.figure.Figure`` out (never pyplot)."""

from lightning_attn.plots.attention import (
    plot_attention_heads,
    plot_attention_maps,
    plot_head_contributions,
    plot_head_statistics,
    plot_layer_evolution,
    plot_modality_pair,
    plot_rollout,
    plot_top_positions,
)
from lightning_attn.plots.calibration import (
    plot_calibration_trend,
    plot_classwise_reliability,
    plot_confidence_histogram,
    plot_reliability_diagram,
)
from lightning_attn.plots.heads import (
    plot_feature_correlations,
    plot_head_evolution,
    plot_head_redundancy,
    plot_head_type_scores,
    plot_hsi,
)
from lightning_attn.plots.probes import (
    plot_channel_heatmaps,
    plot_over_time,
    plot_weight_histograms,
    plot_weight_statistics,
    plot_weights_over_time,
)

#: Every ``plot_*`` function of the figure modules (their helpers, e.g. ``short_site_names``, stay there).
__all__ = [
    "plot_attention_heads",
    "plot_attention_maps",
    "plot_calibration_trend",
    "plot_channel_heatmaps",
    "plot_classwise_reliability",
    "plot_confidence_histogram",
    "plot_feature_correlations",
    "plot_head_contributions",
    "plot_head_evolution",
    "plot_head_redundancy",
    "plot_head_statistics",
    "plot_head_type_scores",
    "plot_hsi",
    "plot_layer_evolution",
    "plot_modality_pair",
    "plot_over_time",
    "plot_reliability_diagram",
    "plot_rollout",
    "plot_top_positions",
    "plot_weight_histograms",
    "plot_weight_statistics",
    "plot_weights_over_time",
]
