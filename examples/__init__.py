"""Runnable examples: a LightningModule and a LightningDataModule per file, trained through
``python -m lightning_attn.cli fit --config configs/<example>.yaml`` (run from the repository root).
Their shared scaffold (training/evaluation steps, metrics, optimizer, splits and DataLoaders) is in
:mod:`examples.common`.

- :mod:`examples.digits_vit`: a small vision transformer on scikit-learn's bundled 8x8 digits;
- :mod:`examples.cross_modal`: signal and spectrogram tokens with cross-attention both ways;
- :mod:`examples.minilm_text`: all-MiniLM-L6-v2 fine-tuned on a tiny generated topic set (offline);
- :mod:`examples.stockformer`: gated cross-attention to a market context and attention pooling.
"""
