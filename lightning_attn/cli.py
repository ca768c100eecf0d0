"""Command line: ``python -m lightning_attn.cli`` (or the ``lightning-attn`` console script).

- ``fit | validate | test | predict``: Lightning's ``LightningCLI`` in subclass mode for the model and
  the data module, so a YAML config names both by ``class_path``, e.g.::

      python -m lightning_attn.cli fit --config configs/digits_vit.yaml
      python -m lightning_attn.cli fit --config configs/digits_vit.yaml --config configs/loggers/wandb.yaml
      python -m lightning_attn.cli fit --config configs/digits_vit.yaml --trainer.max_epochs 2

  Two additions to the stock CLI:

  - ``--test_after_fit true`` (a top-level key of ``fit`` configs): after ``fit``, run ``test`` on the
    best checkpoint of the same Trainer, so one command trains and measures test accuracy;
  - a logger of :mod:`lightning_attn.loggers` with ``save_dir: null`` gets ``trainer.default_root_dir``,
    so the shared ``configs/loggers/*.yaml`` files write inside each example's directory.

- ``report ...``: the post-hoc explainability report, :func:`lightning_attn.report.cli.main`
  (``python -m lightning_attn.cli report --help``).
- ``compare REPORT_A REPORT_B [...] --out DIR``: reports side by side, :func:`lightning_attn.report.compare.main`.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["AttnLightningCLI", "main"]  # noqa: F822 (AttnLightningCLI is built lazily by __getattr__)


@functools.cache
def _lightning_cli_class() -> type:
    from jsonargparse import Namespace
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class AttnLightningCLI(LightningCLI):
        """``LightningCLI`` with ``--test_after_fit`` and run-directory defaults for lightning_attn loggers."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument(
                "--test_after_fit",
                type=bool,
                default=False,
                help="fit only: after fitting, test the best checkpoint (or the last weights without one)",
            )

        def before_instantiate_classes(self) -> None:
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            trainer = config.get("trainer") if config is not None else None
            if trainer is None:
                return
            root = str(trainer.get("default_root_dir") or ".")
            logger = trainer.get("logger")
            for entry in logger if isinstance(logger, list) else [logger]:
                if not isinstance(entry, Namespace) or not str(entry.get("class_path", "")).startswith(
                    "lightning_attn.loggers."
                ):
                    continue
                init_args = entry.get("init_args")
                if init_args is not None and init_args.get("save_dir") is None:
                    init_args["save_dir"] = root

        def after_fit(self) -> None:
            config = self.config.get("fit") if self.subcommand == "fit" else None
            if not config or not config.get("test_after_fit"):
                return
            if self.trainer.interrupted:
                return
            checkpoint = self.trainer.checkpoint_callback
            ckpt_path = "best" if checkpoint is not None and bool(getattr(checkpoint, "best_model_path", "")) else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)

    return AttnLightningCLI


def __getattr__(name: str) -> Any:  # lazy: importing the module does not import Lightning's CLI machinery
    if name == "AttnLightningCLI":
        return _lightning_cli_class()
    raise AttributeError(name)


USAGE = """usage: lightning-attn {fit,validate,test,predict,report,compare} ...

Lightning's CLI (model and data module by class_path in a YAML config) with the lightning_attn callbacks:
  fit        train, validate every epoch; `--test_after_fit true` then tests the best checkpoint
  validate   run the validation loop once
  test       run the test loop (with `--ckpt_path`)
  predict    run the predict loop
  report     the post-hoc explainability report of a checkpoint
  compare    reports side by side: `lightning-attn compare REPORT_A REPORT_B --out DIR`

Each subcommand has its own help: `lightning-attn fit --help`, `lightning-attn report --help`,
`lightning-attn compare --help`.
Example: lightning-attn fit --config configs/digits_vit.yaml"""


def run_lightning(argv: Sequence[str] | None = None) -> Any:
    """Run ``LightningCLI`` on ``argv`` (``None``: ``sys.argv[1:]``), model and data in subclass mode, the saved
    config overwritten; returns the ``LightningCLI`` object (``.trainer``, ``.model``, ``.datamodule``).

    Under a multi-process strategy (``--trainer.strategy ddp``) Lightning starts the other ranks by running
    this process's command line again, so a script that passes ``argv`` must build the same list every time.
    """
    import warnings

    from lightning.pytorch import LightningDataModule, LightningModule

    cli_class = _lightning_cli_class()
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*LightningCLI's args parameter is intended to run from within Python.*"
        )
        return cli_class(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=None if argv is None else list(argv),
        )


def run_report(argv: Sequence[str]) -> int:
    """Delegate to :func:`lightning_attn.report.cli.main`; exit status 2 when the report is not installed."""
    try:
        from lightning_attn.report.cli import main as report_main
    except ImportError as error:
        print(f"lightning-attn report: the report module is not available ({error})", file=sys.stderr)
        return 2
    result = report_main(list(argv))
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lightning_attn.cli`` and the ``lightning-attn`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "report":
        return run_report(args[1:])
    if args and args[0] == "compare":
        from lightning_attn.report.compare import main as compare_main

        return compare_main(args[1:])
    # class_path entries such as examples.digits_vit.DigitsViT resolve from the working directory, for the
    # console script as for `python -m` (which puts it on sys.path itself).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if args in ([], ["-h"], ["--help"]):
        print(USAGE)
        return 0 if args else 2
    run_lightning(argv)
    end_process_group()
    return 0


def end_process_group() -> None:
    """Destroy the process group of a multi-process run once every rank is done. Lightning leaves it open, and
    gloo torn down by interpreter exit instead can abort a rank ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
