"""CalibrationMetric against torchmetrics' MulticlassCalibrationError: update throughput and memory.

One run, side by side, at 1e5, 1e6 and 1e7 samples of 100 classes (logits, fed in batches of
``--batch`` rows cycled from a small pre-generated pool: the data never exist all at once):

- ``ours``: :class:`lightning_attn.metrics.CalibrationMetric` (default settings, no bootstrap) computes
  ECE, MCE, RMSCE, adaptive ECE, classwise ECE, smooth ECE, debiased L2 error, Brier, NLL, accuracy and
  confidences from sum-reduced histograms;
- ``ours_bootstrap``: the same with ``bootstrap=200`` (CalibrationMonitor's default): 95% intervals of
  ECE, accuracy, Brier and each bin's accuracy from 200 hash-keyed Poisson bootstrap replicates;
- ``torchmetrics``: ``MulticlassCalibrationError(num_classes=100, n_bins=15)`` (default settings,
  input validation on) computes the ECE only, from one confidence and one accuracy kept per sample.

Each (implementation, size) runs in a fresh subprocess so allocator state does not carry over.

- update throughput: samples per second through ``update`` (after two warm-up batches);
- compute: time of ``compute()`` at the end;
- state: bytes the metric holds after the last update (tensor states; list states summed element by element);
- peak RSS: the increase of the resident set over one pass (update + compute), read from the kernel's
  peak counter (``VmHWM``) after resetting it (``/proc/self/clear_refs``), in a separate subprocess where
  glibc serves blocks of 128 KiB and more by ``mmap`` and returns them on free, so that RSS follows live
  memory (that costs page faults, hence not in the timed runs). ``tracemalloc`` would see none of it:
  it traces the Python allocator only, and tensor storage comes from torch's own CPU allocator
  (``torch.cuda`` memory statistics have no CPU counterpart).

Times are the fastest of ``--repeats`` passes (wall clock, and process CPU time, which a loaded
machine disturbs less), with the default allocator.

    python benchmarks/bench_calibration.py [--sizes 1e5 1e6 1e7] [--classes 100] [--batch 10000] [--threads 1]
    [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULT_TAG = "RESULT "


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:  # "5": reset the peak RSS (VmHWM) to the current RSS
        handle.write("5")


def _state_bytes(metric) -> int:
    total = 0
    for name in metric._defaults:
        value = getattr(metric, name)
        for tensor in value if isinstance(value, list) else [value]:
            total += tensor.numel() * tensor.element_size()
    return total


def worker(impl: str, mode: str, samples: int, classes: int, batch: int, threads: int, repeats: int) -> dict:
    if mode == "memory":  # glibc: blocks >= 128 KiB by mmap, returned on free: RSS follows live memory
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    from torchmetrics.classification import MulticlassCalibrationError

    from lightning_attn.metrics import CalibrationMetric

    g = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(4):
        logits = torch.randn(batch, classes, generator=g) * 3
        target = torch.where(
            torch.rand(batch, generator=g) < 0.7, logits.argmax(1), torch.randint(0, classes, (batch,), generator=g)
        )
        pool.append((logits, target))
    if impl in ("ours", "ours_bootstrap"):
        replicates = 200 if impl == "ours_bootstrap" else 0
        metric = CalibrationMetric("multiclass", classes, score_type="logits", bootstrap=replicates)
    else:
        metric = MulticlassCalibrationError(num_classes=classes, n_bins=15)
    for logits, target in pool[:2]:  # warm-up
        metric.update(logits, target)
    steps = samples // batch
    result: dict = {"impl": impl, "samples": steps * batch}
    gc.collect()
    base = _rss_kib("VmRSS")
    _reset_peak()
    update_s = update_cpu = compute_s = float("inf")
    for _ in range(1 if mode == "memory" else repeats):  # the fastest pass counts
        metric.reset()
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(steps):
            metric.update(*pool[i % len(pool)])
        update_s = min(update_s, time.perf_counter() - wall)
        update_cpu = min(update_cpu, time.process_time() - cpu)
        result["state_bytes"] = _state_bytes(metric)
        start = time.perf_counter()
        value = metric.compute()
        compute_s = min(compute_s, time.perf_counter() - start)
    result["ece"] = float(value["ece"] if isinstance(value, dict) else value)
    if mode == "memory":
        result["peak_rss_bytes"] = max(0, _rss_kib("VmHWM") - base) * 1024
    else:
        result.update(update_s=update_s, update_cpu_s=update_cpu, compute_s=compute_s)
    return result


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per measurement; the fastest counts")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "MODE", "SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, mode, samples = args.worker
        result = worker(impl, mode, int(float(samples)), args.classes, args.batch, args.threads, args.repeats)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    import torch
    import torchmetrics

    print(
        f"torch {torch.__version__}, torchmetrics {torchmetrics.__version__}, {os.cpu_count()} CPUs, "
        f"{args.threads} torch thread(s), {args.classes} classes, logits in batches of {args.batch}"
    )
    rows = []
    for size in args.sizes:
        results: dict[str, dict] = {"ours": {}, "ours_bootstrap": {}, "torchmetrics": {}}
        for mode in ("time", "memory"):
            for impl in results:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    impl,
                    mode,
                    str(size),
                    "--classes",
                    str(args.classes),
                    "--batch",
                    str(args.batch),
                    "--threads",
                    str(args.threads),
                    "--repeats",
                    str(args.repeats),
                ]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                line = next((entry for entry in done.stdout.splitlines() if entry.startswith(RESULT_TAG)), None)
                if done.returncode or line is None:
                    raise RuntimeError(
                        f"{impl}/{mode} at {size:.0e} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
                    )
                results[impl].update(json.loads(line[len(RESULT_TAG) :]))
        for impl, r in results.items():
            print(
                f"  {impl:14s} {r['samples']:>10,d} samples: update {r['update_s']:.2f} s "
                f"(CPU {r['update_cpu_s']:.2f} s), "
                f"compute {r['compute_s'] * 1e3:.0f} ms, state {_human(r['state_bytes'])}, "
                f"peak RSS +{_human(r['peak_rss_bytes'])}, ECE {r['ece']:.6f}",
                flush=True,
            )
        rows.append(results)

    print()
    print(
        "| samples | update ours (samples/s) | update torchmetrics (samples/s) | throughput ours / tm (wall) "
        "| ours / tm (CPU time) | compute ours / tm (ms) | state ours / tm | peak RSS ours / tm | memory tm / ours |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for results in rows:
        o, t = results["ours"], results["torchmetrics"]
        n = o["samples"]
        thr_o, thr_t = n / o["update_s"], n / t["update_s"]
        mem_ratio = max(t["peak_rss_bytes"], t["state_bytes"]) / max(o["peak_rss_bytes"], o["state_bytes"], 1)
        print(
            f"| {n:.0e} | {thr_o:,.0f} | {thr_t:,.0f} | {thr_o / thr_t:.2f}x "
            f"| {t['update_cpu_s'] / o['update_cpu_s']:.2f}x "
            f"| {o['compute_s'] * 1e3:.0f} / {t['compute_s'] * 1e3:.0f} | {_human(o['state_bytes'])} / "
            f"{_human(t['state_bytes'])} "
            f"| {_human(o['peak_rss_bytes'])} / {_human(t['peak_rss_bytes'])} | {mem_ratio:.1f}x |"
        )
    print()
    print(
        "| samples | ours, bootstrap off (samples/s) | ours, bootstrap=200 (samples/s) | torchmetrics (samples/s) "
        "| bootstrap=200 / tm (wall) | bootstrap cost per 1e5 samples (s) | state off / on |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for results in rows:
        o, b, t = results["ours"], results["ours_bootstrap"], results["torchmetrics"]
        n = o["samples"]
        extra = (b["update_s"] - o["update_s"]) / n * 1e5
        print(
            f"| {n:.0e} | {n / o['update_s']:,.0f} | {n / b['update_s']:,.0f} | {n / t['update_s']:,.0f} "
            f"| {t['update_s'] / b['update_s']:.2f}x | {extra:.3f} "
            f"| {_human(o['state_bytes'])} / {_human(b['state_bytes'])} |"
        )
    print()
    print("ours / tm > 1: ours is faster. memory tm / ours > 1: ours holds less (the larger of state and peak RSS).")
    print(
        "Ours computes ECE, MCE, RMSCE, adaptive ECE, classwise ECE (all K probabilities binned), Brier, NLL, "
        "accuracy and"
    )
    print("confidences in one pass; torchmetrics the top-label ECE only.")


if __name__ == "__main__":
    main()
