"""Recorder overhead on a forward pass, as a ratio to the plain forward, measured side by side.

Streaming mode (keep=False) with a consumer that materializes every map (what the callbacks do), and
with no consumer (the cost of interception alone). Models: nn.TransformerEncoder (eval fast path),
the same with need_weights computed anyway (nn.MultiheadAttention returning weights), and a
BERT-size Hugging Face BertModel (12 x 768, 12 heads) on its default SDPA at 128 tokens.

    python benchmarks/bench_recorder.py [--device cuda] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lightning_attn import AttentionRecorder


class WeightsAnyway(nn.Module):
    """A model that asks its attention for per-head weights itself (the weights are computed anyway)."""

    def __init__(self, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn in self.attn:
            out, _ = attn(x, x, x, need_weights=True, average_attn_weights=False)
            x = x + out
        return x


def timed(fn, repeats: int, device: str) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(name: str, model: nn.Module, inputs: dict, repeats: int, device: str) -> list[str]:
    model = model.to(device).eval()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    sink = []

    def plain() -> None:
        model(**inputs)

    def streaming_consumer() -> None:
        with AttentionRecorder(model, keep=False, on_attention=lambda site, probs: sink.append(probs.shape)):
            model(**inputs)
        sink.clear()

    def interception_only() -> None:
        with AttentionRecorder(model, keep=False):
            model(**inputs)

    rows = []
    with torch.inference_mode():
        # Interleave the variants so that machine noise hits them alike.
        times = {"plain": [], "consumer": [], "interception": []}
        for _ in range(3):
            times["plain"].append(timed(plain, repeats, device))
            times["consumer"].append(timed(streaming_consumer, repeats, device))
            times["interception"].append(timed(interception_only, repeats, device))
    base = min(times["plain"])
    rows.append(
        f"| {name} | {base * 1e3:.1f} | {min(times['interception']) / base:.3f} | {min(times['consumer']) / base:.3f} |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)

    rows = ["| model | plain forward (ms) | interception only | keep=False + consumer |", "|---|---|---|---|"]
    layer = nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    rows += measure(
        "nn.TransformerEncoder 4x256, B=16, L=128",
        encoder,
        {"src": torch.randn(16, 128, 256)},
        args.repeats,
        args.device,
    )
    rows += measure(
        "MultiheadAttention need_weights=True 4x256, B=16, L=128",
        WeightsAnyway(256, 8, 4),
        {"x": torch.randn(16, 128, 256)},
        args.repeats,
        args.device,
    )
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        print("transformers not installed: BERT row skipped")
    else:
        bert = BertModel(BertConfig())  # bert-base size: 12 layers, 768 hidden, 12 heads; default sdpa
        ids = torch.randint(0, bert.config.vocab_size, (8, 128))
        rows += measure("BertModel base (sdpa), B=8, L=128", bert, {"input_ids": ids}, args.repeats, args.device)
    print(f"device: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
