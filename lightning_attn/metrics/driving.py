"""Domain defaults: the feature labels of the driving-scene Head Specialization Analysis notebook."""

from __future__ import annotations

from lightning_attn.metrics.head_labels import FeatureLabel

#: Default feature labels, those of the Head Specialization Analysis notebook (``FEATURE_TO_LABEL``): feature
#: name (the key of the tracker's ``features`` argument) to ``(label, description, expected sign)``.
DEFAULT_FEATURE_LABELS: dict[str, FeatureLabel] = {
    "ttc": FeatureLabel("Safety Head", "Attends to low-TTC (collision threats)", -1),
    "distance": FeatureLabel("Proximity Head", "Attends to nearby vehicles", -1),
    "closing_speed": FeatureLabel("Threat Assessment", "Attends to approaching vehicles", 1),
    "is_ahead": FeatureLabel("Traffic Flow", "Attends to leading vehicles", 1),
    "is_left": FeatureLabel("Lane Awareness", "Monitors adjacent lanes (left)", 1),
    "is_right": FeatureLabel("Lane Awareness", "Monitors adjacent lanes (right)", 1),
}
