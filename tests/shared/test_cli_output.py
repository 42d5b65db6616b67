"""Output written to a log or pipe keeps its full width: rich would cut it to 80 columns."""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rich.table import Table
from tests.procs import ROOT



def _exe() -> str:
    return shutil.which("prefill-router") or str(Path(sys.executable).parent / "prefill-router")


def test_models_list_piped_shows_whole_names(registry):
    """``prefill-router models list | cat``: every name and source whole, nothing ellipsized."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's code, whichever checkout the console script was installed from
    out = subprocess.run([_exe(), "models", "list"], capture_output=True, text=True, timeout=120,
                         check=True, env=env, stdin=subprocess.DEVNULL).stdout
    assert "…" not in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    cells = {cell.strip() for row in rows for cell in row.split("│")}
    for m in registry.models:
        assert m.name in cells, f"{m.name!r} not whole in:\n{out}"
        assert m.source in cells
    assert "qwen2.5-coder-1.5b-q4" in cells


def test_piped_console_prints_any_table_whole_and_keeps_rules_short(monkeypatch):
    from shared.cli_utils import RULE_WIDTH, CliConsole

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    buf = io.StringIO()
    console = CliConsole(file=buf)
    table = Table(title="long cells")
    table.add_column("name")
    table.add_column("path")
    table.add_row("a" * 300, "runs/" + "b" * 500 + "/report.md")
    console.print(table)
    console.rule("[bold]stage 1")
    console.rule("stage " + "c" * 200)
    lines = buf.getvalue().splitlines()
    assert any("a" * 300 in line and "runs/" + "b" * 500 + "/report.md" in line for line in lines)
    assert "…" not in buf.getvalue()
    rules = [line for line in lines if "stage" in line]
    assert len(rules[0]) == RULE_WIDTH and "stage 1" in rules[0]
    assert "c" * 200 in rules[1] and len(rules[1]) < 300


def test_explicit_width_and_terminals_keep_rich_sizing(monkeypatch):
    from shared.cli_utils import PIPE_WIDTH, CliConsole

    monkeypatch.delenv("COLUMNS", raising=False)
    assert CliConsole(file=io.StringIO(), width=50).width == 50
    assert CliConsole(file=io.StringIO(), force_terminal=True, width=70).width == 70
    assert CliConsole(file=io.StringIO(), force_terminal=True).width < PIPE_WIDTH  # the terminal's own width
    monkeypatch.setenv("COLUMNS", "90")
    assert CliConsole(file=io.StringIO()).width == 90
