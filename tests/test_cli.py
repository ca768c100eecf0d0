"""The top-level command line: its help lists every subcommand and needs none of the heavy imports."""

from __future__ import annotations

import subprocess
import sys


def test_top_level_help_lists_subcommands_without_importing_torch() -> None:
    code = (
        "import sys\n"
        "from lightning_attn.cli import main\n"
        "status = main(['--help'])\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'matplotlib') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: lightning-attn {fit,validate,test,predict,report,compare}")
    for command in ("fit", "validate", "test", "predict", "report", "compare"):
        assert f"\n  {command} " in done.stdout
    assert "HEAVY []" in done.stdout


def test_no_arguments_is_a_usage_error() -> None:
    from lightning_attn.cli import main

    assert main([]) == 2
