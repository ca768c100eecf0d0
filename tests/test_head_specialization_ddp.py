"""HeadSpecializationTracker under DDP on CPU (2 processes, gloo) equals one process over the same samples.

DDP runs in a subprocess script (Lightning relaunches the script itself as rank 1) with the launcher's
variables removed from its environment; rank zero writes the tracker's streamed results to a JSON file.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
from helpers import run_script

from lightning_attn import HeadSpecializationTracker

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    sys.path.insert(0, {tests!r})
    warnings.filterwarnings("ignore")
    import lightning.pytorch as pl
    from lightning_attn import HeadSpecializationTracker
    from planted_heads import FEATURES, make_loader, make_module, summarize, trainer_kwargs
    from helpers import end_process_group
    from pathlib import Path

    tracker = HeadSpecializationTracker(features=FEATURES, feature_masks=None, probe_samples=2, log_figures=False,
                                        export_registry=False, logged_scores=("entropy", "hsi"))
    trainer = pl.Trainer(callbacks=[tracker], **trainer_kwargs(Path({root!r}), devices=2, strategy="ddp"))
    logged = trainer.validate(make_module(), make_loader(), verbose=False)[0]
    if trainer.is_global_zero:
        out = {{"summary": summarize(tracker), "world_size": trainer.world_size,
               "logged": {{k: float(v) for k, v in logged.items()}}}}
        Path({out!r}).write_text(json.dumps(out))
    end_process_group()
    """
)


def assert_close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_close(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b, strict=False)):
            assert_close(x, y, f"{path}[{index}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6), path
    else:
        assert a == b, path


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_equals_one_process(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), root=str(tmp_path), out=str(out)))
    run_script(script, cwd=tmp_path)
    ddp = json.loads(out.read_text())
    assert ddp["world_size"] == 2

    sys.path.insert(0, str(TESTS))
    from planted_heads import FEATURES, make_loader, make_module, summarize, trainer_kwargs

    tracker = HeadSpecializationTracker(
        features=FEATURES, probe_samples=2, log_figures=False, export_registry=False, logged_scores=("entropy", "hsi")
    )
    trainer = pl.Trainer(callbacks=[tracker], **trainer_kwargs(tmp_path / "single"))
    logged = trainer.validate(make_module(), make_loader(), verbose=False)[0]
    single = summarize(tracker)
    assert_close(ddp["summary"], single)
    heads_logged = {k: float(v) for k, v in logged.items() if k.startswith("heads/")}
    assert_close({k: v for k, v in ddp["logged"].items() if k.startswith("heads/")}, heads_logged)
    assert single["labels"]["model.layers.0"][3] == "Safety Head"
    assert ddp["summary"]["rows"]["model.layers.0"] == [256.0 * 16] * 6  # every sample once, none padded in
