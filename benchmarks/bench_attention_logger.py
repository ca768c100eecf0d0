"""Cost of AttentionLogger on a validation epoch, against the same epoch without it and a naive baseline.

Measured in one run, side by side:

- ``nn.TransformerEncoder`` 4 x 512, 8 heads, feed-forward 2048, 128 tokens, in PyTorch's default
  sequence-first layout (attention through ``scaled_dot_product_attention``, which the recorder intercepts);
- the same with ``batch_first=True``: in eval it runs the fused fast path, whose queries and keys are not
  exposed, so the recorder re-projects them (its cost, not the statistics', shows in "capture only");
- a BERT-size Hugging Face ``BertModel`` from ``BertConfig()`` (12 x 768, 12 heads, no download) on its
  default SDPA attention, 128 tokens, few small batches (it is slow on a small CPU).

Variants of the same ``trainer.validate`` epoch:

- ``plain``: no callback;
- ``capture only``: an ``AttentionRecorder`` computing every probability chunk and nothing else;
- ``stats``: ``AttentionLogger(log_figures=False)``: every statistic, logged, table + JSON on disk;
- ``stats+figures``: the same with every figure (rendered to PNG on disk) - a fixed cost per epoch;
- ``stats, every_n_batches=2/4``: only every 2nd/4th batch recorded;
- ``naive``: the seeds' way: keep every map of every batch (``AttentionRecorder(keep=True)``) and compute the
  same statistics at epoch end with ``lightning_attn.functional`` (checked equal to ours).

Time: the validation epoch (epoch start to epoch end, the callbacks' epoch-end work included), as CPU time
of the process (``time.process_time``) and as wall time, the minimum over ``--repeats`` interleaved
repeats. With one intra-op thread (``--threads 1``, the default) CPU time is the work done whatever else
runs on the machine; wall time is only meaningful on an idle machine.

Memory (a separate pass after the timings, with glibc told to return freed blocks at once so that the
resident set follows live memory): the peak increase of the process RSS over the epoch, sampled every
5 ms, and the bytes the callback holds at epoch end (metric states, or the naive list of maps), for the
full epoch and for half of it.

    python benchmarks/bench_attention_logger.py [--repeats 2] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_attn import AttentionLogger, AttentionRecorder
from lightning_attn.functional import (
    first_token_mass,
    max_weight,
    mean_attention_distance,
    normalized_entropy,
    sparsity,
)

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
os.environ.setdefault("MPLBACKEND", "Agg")
PAGE = os.sysconf("SC_PAGE_SIZE")
try:
    _LIBC: Any = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: RSS peaks are then upper bounds
    _LIBC = None


# -- models -----------------------------------------------------------------------------------------------
class EncoderModule(pl.LightningModule):
    def __init__(
        self,
        dim: int = 512,
        heads: int = 8,
        layers: int = 4,
        ff: int = 2048,
        batch_first: bool = False,
        vocab: int = 1000,
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.batch_first:
            return self.head(self.encoder(x)[:, 0])
        return self.head(self.encoder(x.transpose(0, 1))[0])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        tokens, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self(tokens), labels))


class BertModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig())  # default attn_implementation: sdpa
        self.head = nn.Linear(768, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=tokens).last_hidden_state[:, 0])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        tokens, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self(tokens), labels))


# -- the naive baseline -----------------------------------------------------------------------------------
class NaiveAttentionStats(Callback):
    """Keep every map of every batch; compute the statistics at epoch end (the seeds' way)."""

    def __init__(self) -> None:
        self.maps: list[dict[str, torch.Tensor]] = []
        self.recorder: AttentionRecorder | None = None
        self.results: dict[str, dict[str, torch.Tensor]] = {}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.recorder = AttentionRecorder(pl_module, keep=True)
        self.recorder.__enter__()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.recorder.__exit__(None, None, None)
        self.maps.append(dict(self.recorder.maps))
        self.recorder = None

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for maps in self.maps for t in maps.values())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        for site in self.maps[0]:
            probs = torch.cat([maps[site] for maps in self.maps])
            rows = {
                "entropy": normalized_entropy(probs),
                "max_weight": max_weight(probs),
                "sparsity": sparsity(probs, 0.01),
                "distance": mean_attention_distance(probs),
                "first_token": first_token_mass(probs),
            }
            self.results[site] = {name: value.transpose(0, 1).flatten(1).mean(1) for name, value in rows.items()}
            self.results[site]["received"] = probs.mean((0, 1, 2))
            for name, value in self.results[site].items():
                if name != "received":
                    pl_module.log(f"naive/{site}/{name}", value.mean())


class CaptureOnly(Callback):
    """The recorder alone: every probability chunk computed (as the logger does), nothing reduced."""

    def __init__(self, chunk_size: int | None = 256) -> None:
        self.chunk_size = chunk_size
        self.recorder: AttentionRecorder | None = None

    def _consume(self, capture: Any) -> None:
        for _ in capture.chunks(self.chunk_size):
            pass

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.recorder = AttentionRecorder(pl_module, keep=False, on_capture=self._consume)
        self.recorder.__enter__()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.recorder.__exit__(None, None, None)
        self.recorder = None


# -- measurement ------------------------------------------------------------------------------------------
class EpochMeter:
    """Two callbacks: the first of the list starts the clocks, the last one stops them, so the other
    callbacks' epoch-start and epoch-end work are inside; optionally an RSS sampler runs in between."""

    def __init__(self, sample_rss: bool) -> None:
        self.cpu = self.wall = 0.0
        self.peak = self.base = 0
        self.sample_rss = sample_rss
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        meter = self

        class Start(Callback):
            def on_validation_epoch_start(self, trainer, pl_module) -> None:
                gc.collect()
                if meter.sample_rss:
                    if _LIBC is not None:
                        _LIBC.malloc_trim(0)
                    meter.base = meter.peak = _rss()
                    meter._stop.clear()
                    meter._thread = threading.Thread(target=meter._sample, daemon=True)
                    meter._thread.start()
                meter._wall, meter._cpu = time.perf_counter(), time.process_time()

        class End(Callback):
            def on_validation_epoch_end(self, trainer, pl_module) -> None:
                meter.wall = time.perf_counter() - meter._wall
                meter.cpu = time.process_time() - meter._cpu
                if meter._thread is not None:
                    meter._stop.set()
                    meter._thread.join()
                    meter.peak = max(meter.peak, _rss())

        self.start, self.end = Start(), End()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    @property
    def peak_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def held_bytes(callback: Callback | None) -> int:
    """Bytes of the callback's statistics states (the naive baseline: of its kept maps)."""
    if isinstance(callback, NaiveAttentionStats):
        return callback.held_bytes()
    if isinstance(callback, AttentionLogger):
        total = 0
        for acc in callback._states.values():
            for metric in (acc.stats, acc.positions, acc.agreement):
                for value in metric.metric_state.values():
                    for tensor in value if isinstance(value, list) else [value]:
                        total += tensor.numel() * tensor.element_size()
        return total
    return 0


def run_epoch(
    module: pl.LightningModule,
    loader: torch.utils.data.DataLoader,
    batches: int,
    callback: Callback | None,
    root: str,
    sample_rss: bool = False,
) -> EpochMeter:
    meter = EpochMeter(sample_rss)
    callbacks = [meter.start] + ([callback] if callback is not None else []) + [meter.end]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=batches,
        callbacks=callbacks,
        default_root_dir=root,
    )
    trainer.validate(module, loader, verbose=False)
    return meter


def make_loader(seq: int, batch: int, batches: int, vocab: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch * batches, seq), generator=generator)
    labels = torch.randint(0, 2, (batch * batches,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, labels), batch_size=batch)


Make = Callable[[str], "Callback | None"]
VARIANTS: dict[str, Make] = {
    "plain": lambda root: None,
    "capture only": lambda root: CaptureOnly(),
    "stats": lambda root: AttentionLogger(log_figures=False, save_dir=root),
    "stats+figures": lambda root: AttentionLogger(save_dir=root),
    "stats, every_n_batches=2": lambda root: AttentionLogger(log_figures=False, every_n_batches=2, save_dir=root),
    "stats, every_n_batches=4": lambda root: AttentionLogger(log_figures=False, every_n_batches=4, save_dir=root),
    "naive (keep all maps)": lambda root: NaiveAttentionStats(),
}


def time_model(
    name: str,
    module: pl.LightningModule,
    loader: torch.utils.data.DataLoader,
    batches: int,
    variants: list[str],
    repeats: int,
    root: str,
) -> list[dict[str, Any]]:
    module.eval()
    run_epoch(module, loader, 1, None, root)  # warm-up: lazy initialisation, allocator, fonts
    run_epoch(module, loader, 1, AttentionLogger(save_dir=root), root)
    samples: dict[str, list[EpochMeter]] = {key: [] for key in variants}
    check: dict[str, Any] = {}
    for _ in range(repeats):
        for key in variants:
            callback = VARIANTS[key](root)
            samples[key].append(run_epoch(module, loader, batches, callback, root))
            if key == "stats":
                check["ours"] = callback.results["val"]
            elif key.startswith("naive"):
                check["naive"] = callback.results
            del callback
            gc.collect()
    if "ours" in check and "naive" in check:
        _check_same_statistics(check["ours"], check["naive"])
    plain_cpu = min(m.cpu for m in samples["plain"])
    plain_wall = min(m.wall for m in samples["plain"])
    rows = []
    for key, meters in samples.items():
        cpu, wall = min(m.cpu for m in meters), min(m.wall for m in meters)
        rows.append(
            {
                "model": name,
                "variant": key,
                "batches": batches,
                "recorded": _recorded(key, batches),
                "cpu": cpu,
                "cpu_ratio": cpu / plain_cpu,
                "wall": wall,
                "wall_ratio": wall / plain_wall,
            }
        )
    return rows


def memory_model(
    name: str, module: pl.LightningModule, loader: torch.utils.data.DataLoader, batches: int, root: str
) -> list[dict[str, Any]]:
    rows = []
    for key in ("plain", "stats", "stats+figures", "naive (keep all maps)"):
        for count in (batches // 2, batches):
            callback = VARIANTS[key](root)
            meter = run_epoch(module, loader, count, callback, root, sample_rss=True)
            rows.append(
                {
                    "model": name,
                    "variant": key,
                    "batches": count,
                    "peak_mib": meter.peak_mib,
                    "held_mib": held_bytes(callback) / 2**20,
                }
            )
            del callback
            gc.collect()
    return rows


def _recorded(key: str, batches: int) -> int:
    if key == "plain":
        return 0
    for n in (2, 4):
        if f"every_n_batches={n}" in key:
            return -(-batches // n)
    return batches


def _check_same_statistics(ours: Any, naive: dict[str, dict[str, torch.Tensor]]) -> None:
    """The benchmark compares like with like: both compute the same numbers."""
    for index, site in enumerate(ours.sites):
        for name in ours.statistics:
            got = ours.mean[name][index, : ours.num_heads[index]]
            want = naive[site][name].double()
            if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
                raise AssertionError(f"{site}/{name}: ours {got} vs naive {want}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU time measures the work)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny runs: a smoke test of this script, not a measurement"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    every = list(VARIANTS)
    batch, seq = (4, 32) if args.quick else (16, 128)
    bert_batch = 2
    timings: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as root:
        encoder = EncoderModule()
        enc_name = f"TransformerEncoder 4x512, 8 heads, seq-first, L={seq}, batch {batch}"
        enc_loader = make_loader(seq, batch, 4, 1000)
        timings += time_model(enc_name, encoder, enc_loader, 4, every, args.repeats, root)
        fast = EncoderModule(batch_first=True)
        fast.load_state_dict(encoder.state_dict())
        timings += time_model(
            f"TransformerEncoder 4x512, batch_first (fused fast path), L={seq}, batch {batch}",
            fast,
            enc_loader,
            4,
            ["plain", "capture only", "stats"],
            args.repeats,
            root,
        )
        bert = BertModule()
        if args.quick:
            bert.bert.encoder.layer = bert.bert.encoder.layer[:2]
        bert_name = f"BertModel 12x768, 12 heads (sdpa), L={seq}, batch {bert_batch}"
        bert_loader = make_loader(seq, bert_batch, 4, 30000)
        timings += time_model(bert_name, bert, bert_loader, 4, every, args.repeats, root)
        # memory last: the allocator setting below makes every large temporary a fresh mapping
        if _LIBC is not None:
            _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: large blocks are mmapped and returned on free
        memory += memory_model(enc_name, encoder, make_loader(seq, batch, 8, 1000), 8, root)
    print()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), CPU; min over {args.repeats} "
        "interleaved repeats; "
        f"total {time.perf_counter() - started:.0f} s."
    )
    print()
    print("| model | variant | batches | recorded | CPU s | x plain (CPU) | wall s | x plain (wall) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in timings:
        print(
            f"| {row['model']} | {row['variant']} | {row['batches']} | {row['recorded']} | {row['cpu']:.2f} | "
            f"{row['cpu_ratio']:.2f} | {row['wall']:.2f} | {row['wall_ratio']:.2f} |"
        )
    print()
    print("| model | variant | batches | RSS peak increase MiB | held by the callback MiB |")
    print("|---|---|---:|---:|---:|")
    for row in memory:
        print(
            f"| {row['model']} | {row['variant']} | {row['batches']} | {row['peak_mib']:.1f} | {row['held_mib']:.3f} |"
        )


if __name__ == "__main__":
    main()
