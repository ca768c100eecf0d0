"""Capture: find every attention site of a model at run time and record its exact probabilities."""

from lightning_attn.capture.probs import attention_probs
from lightning_attn.capture.record import AttentionCapture, SiteInfo
from lightning_attn.capture.recorder import AttentionRecorder, clean_module_name, matches

__all__ = ["AttentionCapture", "AttentionRecorder", "SiteInfo", "attention_probs", "clean_module_name", "matches"]
