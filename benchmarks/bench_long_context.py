"""Long context: time and peak extra memory of the statistics engine at 4,096, 8,192 and 16,384 tokens.

A small Llama-style decoder from a config (2 layers x 128, 4 query heads / 2 key-value heads, default SDPA), one
sequence, one forward pass under ``torch.no_grad``, one intra-op thread. Variants:

- ``plain``: the forward pass alone;
- ``engine, key blocks``: the forward pass with an ``AttentionRecorder`` handing every call to the statistics
  engine for every statistic the callbacks use (entropy, max, sparsity, distance, first-token, diagonals, local
  window, received attention), query chunks of 256 rows, key blocks of ``--key-block`` (the exact online path);
- ``engine, whole rows``: the same with every key of a chunk at once (``O(chunk x L)`` per head).

Each run is its own process, twice: once for the CPU time (default allocator) and once for the peak resident memory
(``ru_maxrss``, with glibc returning large blocks to the system when freed, so that the peak follows the live tensors
rather than the heap's high-water mark); "extra" is the peak minus the plain run's at the same length.

    python benchmarks/bench_long_context.py [--lengths 4096,8192,16384] [--key-block 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

VARIANTS = ("plain", "engine, key blocks", "engine, whole rows")


def run_one(length: int, variant: str, key_block: int) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaModel

    from lightning_attn import AttentionRecorder
    from lightning_attn.metrics.engine import (
        DISTANCE,
        ENTROPY,
        FIRST_TOKEN,
        MAX_WEIGHT,
        RECEIVED,
        Stat,
        StatisticsEngine,
    )

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=length,
    )
    model = LlamaModel(config).eval()
    ids = torch.randint(1, 1000, (1, length))
    stats = (
        ENTROPY,
        MAX_WEIGHT,
        DISTANCE,
        FIRST_TOKEN,
        RECEIVED,
        Stat.sparsity(0.01),
        *(Stat.diagonal(d) for d in (-1, 0, 1)),
        Stat.local(2),
    )
    engine = StatisticsEngine(key_block=key_block if variant == "engine, key blocks" else None)
    with torch.no_grad():
        model(ids[:, :64])  # warm-up
        start = time.process_time()
        if variant == "plain":
            model(ids)
        else:
            with AttentionRecorder(model, keep=False, on_capture=lambda capture: engine.rows(capture, stats, 256)):
                model(ids)
        seconds = time.process_time() - start
    return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--key-block", type=int, default=2048)
    parser.add_argument("--child", nargs=2, metavar=("LENGTH", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(int(args.child[0]), args.child[1], args.key_block)))
        return
    # large blocks straight from mmap and back to the system when freed: the peak resident size then follows the
    # live tensors instead of glibc's heap high-water mark
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    print(f"{'tokens':>7} | {'variant':<20} | {'CPU s':>7} | {'peak MiB':>8} | {'extra MiB':>9}")
    for length in (int(n) for n in args.lengths.split(",")):
        plain_peak = None
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--key-block", str(args.key_block), "--child", str(length), variant]
            timed = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            sized = json.loads(subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout)
            if plain_peak is None:
                plain_peak = sized["peak_mib"]
            extra = sized["peak_mib"] - plain_peak
            print(
                f"{length:>7} | {variant:<20} | {timed['seconds']:>7.2f} | {sized['peak_mib']:>8.0f} | {extra:>9.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
