"""``lightning-attn report``: build the explainability report of a trained model from a checkpoint.

Run as ``lightning-attn report ...`` or ``python -m lightning_attn.report.cli ...``; ``main(argv)`` returns the
exit status (0: written; 2: bad input, one line on stderr; 1: the run itself failed; 130: interrupted).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import pickle
import sys
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROG = "lightning-attn report"

DESCRIPTION = """\
Build a self-contained explainability report of a trained classifier on its test data (or validation
data with --stage validate): per-sample explanations (prediction, confidence, correctness, calibration
bin, per-site attention entropy and most focused head, top attention pairs, modality agreement),
correct-vs-incorrect and class-wise statistics, saliency of a few probe samples (gradient x input,
token saliency for token-id inputs, gradient-weighted attention rollout, optional Grad-CAM), written as report.html
(open it offline), report.json (every
number; JSON Schema in lightning_attn/report/report.schema.json), CSV files, summary.md and PNG figures,
each carrying the SHA-256 of the weights, of the evaluated inputs and of the report settings.

The model and data come from either
  --config: a LightningCLI YAML file (its `model:` and `data:` sections, `class_path` + `init_args`;
            lightning_attn callbacks under `trainer.callbacks`, e.g. a calibration or head-specialization
            callback, run too and get their own sections), with the weights from --checkpoint
            (or the config's `ckpt_path`); or
  --entry:  a Python callable "package.module:function" returning (model, dataloader) or
            (model, datamodule); it receives the checkpoint path if it takes a `checkpoint` argument,
            otherwise --checkpoint (if given) is loaded into the returned model.

The model is called as `model(**inputs)` for a dict batch (the batch minus its target key),
`model(x)` for an (x, y) batch, `model(*inputs)` for (x1, ..., y); its output may be logits, a dict
with "logits", an object with .logits or a tuple starting with them. Pass --forward-fn for anything
else. Targets: --target-key (default: target, targets, label, labels or y), else the last element.

The output directory is written only when the report is complete, and replaced only when it holds a
previous report of this command and nothing else; a folder with other files (or a file) at --out is
never touched: the report then goes to --out-1, --out-2, ... with a warning. An --out that is or
contains the checkpoint or config read is refused. A failed run leaves its partial output in a
sibling `.<name>.incomplete-*` directory with an INCOMPLETE marker file."""

EPILOG = """\
examples:
  lightning-attn report --config config.yaml --checkpoint epoch=9.ckpt --out reports/test
  lightning-attn report --entry my_project.explain:load --checkpoint best.ckpt --out reports/best \\
      --class-names cat,dog --feature-names x=temp,pressure,flow --modality-pair "eeg<->spec=cross_es,cross_se"

exit status: 0 written, 2 bad input (one-line message), 1 the run failed, 130 interrupted."""


class CliError(Exception):
    """A bad input, reported as one line."""


# ---------------------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_argument_group("model and data (one of)")
    choice = source.add_mutually_exclusive_group(required=True)
    choice.add_argument("--config", metavar="YAML", help="LightningCLI config file with model: and data: sections")
    choice.add_argument(
        "--entry", metavar="MODULE:CALLABLE", help="callable returning (model, dataloader | datamodule)"
    )
    source.add_argument(
        "--checkpoint", "--ckpt", metavar="CKPT", help="Lightning checkpoint (or a plain state_dict file)"
    )
    source.add_argument(
        "--model-class", metavar="CLASS", help="model class when the config's model: section has no class_path"
    )
    source.add_argument(
        "--data-class", metavar="CLASS", help="datamodule class when the config's data: section has no class_path"
    )
    source.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint that holds arbitrary Python objects (torch.load weights_only=False); "
        "only for checkpoints you trust",
    )

    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        "-o",
        required=True,
        metavar="DIR",
        help="report directory (a previous report there is replaced on success; anything else is kept "
        "and the report goes to DIR-1, ...)",
    )
    out.add_argument("--title", help="report title (default: Explainability report)")
    out.add_argument("--no-figures", action="store_true", help="write tables only, no PNG figures (faster)")
    out.add_argument(
        "--html-max-rows", type=int, metavar="N", help="at most N rows in the HTML per-sample table (CSV has all)"
    )

    what = parser.add_argument_group("what to explain")
    what.add_argument(
        "--stage", choices=("test", "validate"), default="test", help="evaluation loop to report on (default: test)"
    )
    what.add_argument("--max-batches", type=int, metavar="N", help="report on the first N batches only")
    what.add_argument("--class-names", type=_csv, metavar="A,B,...", help="class names, comma-separated")
    what.add_argument(
        "--feature-names",
        action="append",
        default=[],
        metavar="[INPUT=]F1,F2,...",
        help="names of the last-axis features of a floating input (batch key, input0 ... for tuple batches); "
        "without INPUT= they apply to every input with that many features; repeatable",
    )
    what.add_argument(
        "--forward-fn",
        metavar="MODULE:CALLABLE",
        help="forward_fn(model, batch) -> logits, when the default call does not fit the model",
    )
    what.add_argument(
        "--target-key", metavar="KEY", help="key of the targets in mapping batches (default: target/label/y ...)"
    )
    what.add_argument("--include", action="append", metavar="GLOB", help="attention sites to analyse (repeatable)")
    what.add_argument("--exclude", action="append", metavar="GLOB", help="attention sites to skip (repeatable)")
    what.add_argument(
        "--pair-sites",
        action="append",
        metavar="GLOB",
        help="sites whose top attention pairs are reported (default: last)",
    )
    what.add_argument("--top-k", type=int, metavar="K", help="attention pairs per sample and site (default 3)")
    what.add_argument(
        "--modality-pair",
        action="append",
        default=[],
        metavar="NAME=SITE_AB,SITE_BA",
        help="declared cross-attention pair for modality agreement (repeatable)",
    )
    what.add_argument("--calibration-bins", type=int, metavar="N", help="equal-width confidence bins (default 15)")
    what.add_argument(
        "--probe-samples", type=int, metavar="N", help="first N samples get saliency (default 4, 0: none)"
    )
    what.add_argument(
        "--probe-index", type=int, action="append", metavar="I", help="explicit sample index for saliency (repeatable)"
    )
    what.add_argument(
        "--saliency-target", choices=("predicted", "target"), help="class to explain (default: predicted)"
    )
    what.add_argument(
        "--outputs-are-probabilities", action="store_true", help="the model outputs probabilities, not logits"
    )
    what.add_argument(
        "--saliency",
        choices=("gradient_x_input", "integrated_gradients"),
        help="token saliency on the input embedding layer (token-id inputs; default gradient_x_input)",
    )
    what.add_argument("--n-steps", type=int, metavar="N", help="integrated-gradients points (default 32)")
    what.add_argument(
        "--embedding",
        metavar="MODULE",
        help="input embedding layer (default: get_input_embeddings() or the first nn.Embedding)",
    )
    what.add_argument(
        "--gradcam-layer",
        metavar="GLOB",
        help="Grad-CAM on this module's [batch, tokens, channels] output (e.g. a ViT block's norm1)",
    )
    what.add_argument(
        "--grid", type=_csv, metavar="ROWS,COLS", help="patch grid of the Grad-CAM map (default: inferred when square)"
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--accelerator", default="cpu", help="Lightning accelerator (default cpu: hashes comparable across machines)"
    )
    run.add_argument("--seed", type=int, help="seed everything first (default: the config's seed_everything)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--no-config-callbacks",
        action="store_true",
        help="do not run the config's lightning_attn callbacks (no calibration/head-specialization sections)",
    )
    run.add_argument(
        "--callbacks-dir",
        metavar="DIR",
        help="keep the files of the config's lightning_attn callbacks here (default: a temporary directory, "
        "deleted; their numbers are in the report either way)",
    )
    run.add_argument("--traceback", action="store_true", help="print the full traceback of a failure")
    return parser


# ---------------------------------------------------------------------------------------------------------
# building model and data
# ---------------------------------------------------------------------------------------------------------
def import_object(path: str, what: str, kind: str = "class") -> Any:
    """``package.module.Name`` or ``package.module:Name`` to the object, with a one-line error."""
    if ":" in path:
        module_name, _, attribute = path.partition(":")
    else:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise CliError(f"unknown {kind} {path!r} for {what}: give a full import path such as 'package.module.Name'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise CliError(f"unknown {kind} {path!r} for {what}: no module named {error.name!r}") from None
    except Exception as error:
        raise CliError(f"importing {module_name!r} for {what} failed: {type(error).__name__}: {error}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise CliError(f"unknown {kind} {path!r} for {what}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def instantiate(spec: Any, what: str, default_class: str | None = None) -> Any:
    """Build an object from a LightningCLI-style spec: ``{class_path, init_args}``, a class path string, or
    plain init arguments of ``default_class``. Nested specs in ``init_args`` are built too."""
    if isinstance(spec, str):
        class_path, init_args = spec, {}
    elif isinstance(spec, Mapping) and "class_path" in spec:
        class_path = str(spec["class_path"])
        init_args = dict(spec.get("init_args") or {})
        init_args.update(spec.get("dict_kwargs") or {})
    elif isinstance(spec, Mapping) and default_class is not None:
        class_path, init_args = default_class, dict(spec)
    elif isinstance(spec, Mapping):
        raise CliError(f"the config's {what} section has no class_path: pass --{what.split()[0]}-class")
    else:
        raise CliError(
            f"the config's {what} section must be a mapping with class_path and init_args, got {type(spec).__name__}"
        )
    cls = import_object(class_path, what)
    if not callable(cls):
        raise CliError(f"{class_path!r} for {what} is not a class")
    args = {key: _nested(value, f"{what} argument {key!r}") for key, value in init_args.items()}
    try:
        return cls(**args)
    except TypeError as error:
        raise CliError(f"cannot build {class_path} for {what} from the config: {error}") from None


def _nested(value: Any, what: str) -> Any:
    if isinstance(value, Mapping) and "class_path" in value:
        return instantiate(value, what)
    if isinstance(value, list):
        return [_nested(v, what) for v in value]
    return value


def _config_section(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Top level, or the ``test``/``validate``/``fit`` subcommand section holding ``model``."""
    if "model" in config:
        return config
    for key in ("test", "validate", "fit", "predict"):
        if isinstance(config.get(key), Mapping) and "model" in config[key]:
            return config[key]
    return config


def load_config(path: str) -> Mapping[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise CliError(f"config not found: {path}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CliError(f"cannot parse config {path}: {first}") from None
    if not isinstance(data, Mapping):
        raise CliError(f"config {path} is not a mapping of sections (model:, data:, trainer:)")
    return _config_section(data)


def load_weights(model: Any, checkpoint: str, trust: bool) -> None:
    """Load a Lightning checkpoint's ``state_dict`` (or a plain state_dict file) into ``model`` (strict)."""
    import torch

    try:
        payload = torch.load(checkpoint, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CliError(
            f"checkpoint {checkpoint} holds Python objects that safe loading refuses ({first[:160]}); "
            "if you trust it, pass --trust-checkpoint"
        ) from None
    except Exception as error:
        raise CliError(f"cannot read checkpoint {checkpoint}: {type(error).__name__}: {error}") from None
    if isinstance(payload, Mapping) and "state_dict" in payload:
        state = payload["state_dict"]
    elif isinstance(payload, Mapping) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state = payload
    else:
        raise CliError(f"checkpoint {checkpoint} has no state_dict")
    hook = getattr(model, "on_load_checkpoint", None)
    if callable(hook) and isinstance(payload, Mapping) and "state_dict" in payload:
        hook(payload)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = " ".join(lines[1:3]) if len(lines) > 1 else lines[0] if lines else ""
        raise CliError(f"checkpoint {checkpoint} does not fit {type(model).__name__}: {detail[:300]}") from None


def _call_entry(entry: str, checkpoint: str | None) -> tuple[Any, Any, bool]:
    """``(model, data, checkpoint_was_passed)`` from a ``module:callable`` entry point."""
    if ":" not in entry:
        raise CliError(f"--entry must look like 'package.module:callable', got {entry!r}")
    fn = import_object(entry, "--entry", "callable")
    if not callable(fn):
        raise CliError(f"--entry {entry!r} is not callable")
    parameters: Mapping[str, inspect.Parameter]
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_checkpoint = "checkpoint" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
    result = fn(checkpoint=checkpoint) if takes_checkpoint else fn()
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise CliError(f"--entry {entry!r} must return (model, dataloader), got {type(result).__name__}")
    return result[0], result[1], takes_checkpoint


def _feature_names(values: Sequence[str]) -> Any:
    if not values:
        return None
    mapping: dict[str, list[str]] = {}
    shared: list[str] | None = None
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and "," not in name:
            mapping[name.strip()] = _csv(rest)
        else:
            shared = _csv(value)
    if mapping and shared is not None:
        raise CliError("--feature-names: give either INPUT=names for each input or one shared list, not both")
    return mapping or shared


def _grid(value: Sequence[str] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    if len(value) != 2 or not all(part.isdigit() and int(part) > 0 for part in value):
        raise CliError(f"--grid must look like ROWS,COLS (positive integers), got {','.join(value)!r}")
    return int(value[0]), int(value[1])


def _modality_pairs(values: Sequence[str]) -> dict[str, tuple[str, str]] | None:
    pairs: dict[str, tuple[str, str]] = {}
    for value in values:
        name, sep, sites = value.rpartition("=")
        parts = _csv(sites)
        if not sep or not name or len(parts) != 2:
            raise CliError(f"--modality-pair must look like NAME=SITE_AB,SITE_BA, got {value!r}")
        pairs[name] = (parts[0], parts[1])
    return pairs or None


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------
def _config_callback(spec: Any, class_path: str, directory: str) -> Any:
    """A lightning_attn callback of the config, writing its own files under ``directory`` (not where the
    training run wrote them); its results become a section of the report."""
    spec = {"class_path": class_path} if isinstance(spec, str) else dict(spec)
    init_args = dict(spec.get("init_args") or {})
    cls = import_object(class_path, f"trainer callback {class_path}")
    try:
        takes_save_dir = "save_dir" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        takes_save_dir = False
    if takes_save_dir:
        init_args["save_dir"] = str(Path(directory) / class_path.rsplit(".", 1)[-1])
    spec["init_args"] = init_args
    return instantiate(spec, f"trainer callback {class_path}")


def _refuse_out_over_inputs(out: str, inputs: Mapping[str, str | None]) -> None:
    """Refuse an ``--out`` that is, or is a folder above, an input the command reads (``inputs``: what it is to
    its path): the report would be written around the very file it explains."""
    target = Path(out).resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if source == target or target in source.parents:
            raise CliError(
                f"--out {out} contains the {what} {path} that the report reads: choose another output directory"
            )


def _run(args: argparse.Namespace) -> int:
    import tempfile

    if args.callbacks_dir is not None:
        return _run_with(args, args.callbacks_dir)
    with tempfile.TemporaryDirectory(prefix="lightning-attn-report-callbacks-") as directory:
        return _run_with(args, directory)


def _run_with(args: argparse.Namespace, callbacks_dir: str) -> int:
    import lightning.pytorch as pl
    from torch import nn

    from lightning_attn.report.build import build_report

    if os.getcwd() not in sys.path:
        sys.path.append(
            os.getcwd()
        )  # config class paths of the project in the working directory (after installed packages)
    for name, value in (
        ("--max-batches", args.max_batches),
        ("--html-max-rows", args.html_max_rows),
        ("--top-k", args.top_k),
        ("--calibration-bins", args.calibration_bins),
    ):
        if value is not None and value < 1:
            raise CliError(f"{name} must be >= 1, got {value}")
    if args.probe_samples is not None and args.probe_samples < 0:
        raise CliError(f"--probe-samples must be >= 0, got {args.probe_samples}")
    checkpoint = args.checkpoint
    report_defaults: dict[str, Any] = {}
    callbacks: list[Any] = []
    if args.config:
        config = load_config(args.config)
        checkpoint = checkpoint or config.get("ckpt_path")
        if checkpoint is None:
            raise CliError("no checkpoint: pass --checkpoint (or set ckpt_path in the config)")
        if not Path(checkpoint).is_file():
            raise CliError(f"checkpoint not found: {checkpoint}")
        _refuse_out_over_inputs(args.out, {"checkpoint": checkpoint, "config": args.config})
        seed = args.seed if args.seed is not None else config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool):
            pl.seed_everything(seed, verbose=False)
        if "model" not in config:
            raise CliError(f"config {args.config} has no model: section")
        trainer_section = config.get("trainer") or {}
        for spec in (trainer_section.get("callbacks") or []) if isinstance(trainer_section, Mapping) else []:
            class_path = str(spec.get("class_path", "")) if isinstance(spec, Mapping) else str(spec)
            if class_path.endswith("ExplainabilityReport"):
                report_defaults = dict(spec.get("init_args") or {}) if isinstance(spec, Mapping) else {}
            elif class_path.startswith("lightning_attn.") and not args.no_config_callbacks:
                callbacks.append(_config_callback(spec, class_path, callbacks_dir))
        model = instantiate(config["model"], "model", args.model_class)
        if "data" not in config or config["data"] is None:
            raise CliError(f"config {args.config} has no data: section (or use --entry)")
        data = instantiate(config["data"], "data", args.data_class)
        if not isinstance(model, nn.Module):
            raise CliError(f"the config's model is a {type(model).__name__}, not a torch module")
        load_weights(model, checkpoint, args.trust_checkpoint)
    else:
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise CliError(f"checkpoint not found: {checkpoint}")
        _refuse_out_over_inputs(args.out, {"checkpoint": checkpoint})
        if args.seed is not None:
            pl.seed_everything(args.seed, verbose=False)
        model, data, passed = _call_entry(args.entry, checkpoint)
        if not isinstance(model, nn.Module):
            raise CliError(f"--entry returned a {type(model).__name__} as model, not a torch module")
        if checkpoint is not None and not passed:
            load_weights(model, checkpoint, args.trust_checkpoint)

    kwargs: dict[str, Any] = {
        key: value for key, value in report_defaults.items() if key not in ("stages", "report_dir", "save_dir")
    }
    for key in ("forward_fn", "target_fn", "id_to_token"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = import_object(kwargs[key], f"the report's {key}", "callable")
    explicit = {
        "forward_fn": import_object(args.forward_fn, "--forward-fn", "callable") if args.forward_fn else None,
        "title": args.title,
        "class_names": args.class_names,
        "feature_names": _feature_names(args.feature_names),
        "target_key": args.target_key,
        "include": args.include,
        "exclude": args.exclude,
        "pair_sites": args.pair_sites,
        "top_k": args.top_k,
        "modality_pairs": _modality_pairs(args.modality_pair),
        "calibration_bins": args.calibration_bins,
        "probe_samples": args.probe_samples,
        "probe_indices": args.probe_index,
        "saliency_target": args.saliency_target,
        "max_batches": args.max_batches,
        "html_max_rows": args.html_max_rows,
        "outputs_are_probabilities": args.outputs_are_probabilities or None,
        "figures": False if args.no_figures else None,
        "saliency": args.saliency,
        "n_steps": args.n_steps,
        "embedding": args.embedding,
        "gradcam_layer": args.gradcam_layer,
        "grid": _grid(args.grid),
    }
    kwargs.update({key: value for key, value in explicit.items() if value is not None})
    out = build_report(
        model,
        data,
        args.out,
        stage=args.stage,
        callbacks=callbacks,
        accelerator=args.accelerator,
        progress=not args.no_progress,
        **kwargs,
    )
    summary_line = _summary_line(out)
    print(f"{out / 'report.html'}")
    print(summary_line, file=sys.stderr)
    return 0


def _summary_line(out: Path) -> str:
    import json

    try:
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        d, p = report["dataset"], report["provenance"]
        return (
            f"{PROG}: wrote {out} ({d['num_samples']} samples, accuracy {d['accuracy']:.4f}, ECE {d['ece']:.4f}, "
            f"report sha256 {p['report_sha256'][:16]})"
        )
    except Exception:
        return f"{PROG}: wrote {out}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:500] + ("..." if len(text) > 500 else "")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lightning-attn report``; returns the exit status (``--help`` returns 0)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    from lightning_attn.report.explain import ReportError

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            return _run(args)
    except (CliError, ReportError) as error:
        if args.traceback:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.traceback:
            traceback.print_exc()
        where = _where(error)
        print(
            f"{PROG}: error: {type(error).__name__}: {_one_line(error)}{where} (--traceback for details)",
            file=sys.stderr,
        )
        return 1
    finally:
        for logger, level in zip(loggers, levels, strict=False):
            logger.setLevel(level)


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" [at {Path(last.filename).name}:{last.lineno}]"


if __name__ == "__main__":
    sys.exit(main())
