"""The main job: train the digits ViT with every lightning_attn callback, test it, write the report, print where
everything is. ``bash scripts/main.sh`` sets up the environment and runs this.

    python -m examples.main_job                 # TensorBoard + files on disk
    python -m examples.main_job --wandb         # and Weights & Biases (offline without WANDB_API_KEY / ~/.netrc)
    python -m examples.main_job --trainer.max_epochs 5     # any other argument goes to the CLI

It is ``python -m lightning_attn.cli fit --config configs/digits_vit.yaml`` (plus
``--config configs/loggers/tensorboard_wandb.yaml`` with ``--wandb``), run in this process so that the paths
of the run can be printed at the end.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_vit.yaml"
WANDB_CONFIG = ROOT / "configs" / "loggers" / "tensorboard_wandb.yaml"


def _callback(trainer, name: str):
    return next((cb for cb in trainer.callbacks if type(cb).__name__ == name), None)


def _relative(path: str | Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str]) -> int:
    # The model is tiny: one intra-op thread is as fast as two, and immune to OpenMP threads fighting over the
    # cores of a busy machine (measured here under load: 5 s with one thread, 31 s with two, for 5 epochs).
    # Set OMP_NUM_THREADS to override. Takes effect because torch is not imported yet.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    use_wandb = "--wandb" in argv
    rest = [a for a in argv if a != "--wandb"]
    args = ["fit", "--config", str(CONFIG)] + (["--config", str(WANDB_CONFIG)] if use_wandb else []) + rest
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from lightning_attn.callbacks.base import EvaluationCallback
    from lightning_attn.cli import run_lightning
    from lightning_attn.report.callback import ExplainabilityReport
    from lightning_attn.sinks.layout import output_dir

    start = time.perf_counter()
    cli = run_lightning(args)
    elapsed = time.perf_counter() - start
    trainer = cli.trainer
    metrics = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if k in ("test/acc", "test/loss", "calibration/test/ece")
    }

    lines = ["", "=" * 100, f"main job done in {elapsed:.0f} s (training, test and report)"]
    if "test/acc" in metrics:
        lines.append(
            f"  test accuracy: {metrics['test/acc']:.4f}"
            + (f"   test ECE: {metrics['calibration/test/ece']:.4f}" if "calibration/test/ece" in metrics else "")
        )
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        lines.append(f"  best checkpoint: {_relative(checkpoint.best_model_path)}")
    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            lines.append(
                f"  TensorBoard: {_relative(logger.log_dir)}   view: tensorboard --logdir "
                f"{_relative(Path(logger.log_dir).parent)}"
            )
        elif kind == "WandbLogger":
            run = logger.experiment
            url = None if getattr(logger, "resolved_offline", False) else getattr(run, "url", None)
            if url:
                lines.append(f"  W&B: {url}")
            else:
                run_dir = Path(run.dir).parent if getattr(run, "dir", None) else Path(logger.save_dir) / "wandb"
                lines.append(f"  W&B (offline): {_relative(run_dir)}   upload later: wandb sync {_relative(run_dir)}")
    # where each callback wrote: its save_dir or, as in these configs, the run folder (lightning_attn.sinks.layout)
    for cb in trainer.callbacks:
        if isinstance(cb, EvaluationCallback) and not isinstance(cb, ExplainabilityReport):
            directory = output_dir(trainer, cb.output_name, cb.save_dir)
            if directory.is_dir():
                lines.append(f"  {type(cb).__name__} files (CSV, JSON; figures in the loggers): {_relative(directory)}")
    report = _callback(trainer, "ExplainabilityReport")
    for document in report.results.values() if report is not None else []:
        lines.append(
            f"  explainability report: {_relative(Path(document['directory']) / 'report.html')}   (and report.json, "
            "summary.md, CSV files)"
        )
    lines.append("=" * 100)
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
