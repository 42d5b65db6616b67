"""Small helpers every sub-command uses: config options, error reporting, the console."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.text import Text

PIPE_WIDTH = 10_000  # wider than any table: a table does not expand, so it keeps its natural width
RULE_WIDTH = 80  # a rule fills the width: in a log or pipe it keeps a terminal's usual width


class CliConsole(Console):
    """A rich Console that writes to a log or pipe at full width, not rich's 80 columns.

    Rich sizes a console that is not a terminal at 80 columns, so a table piped to a file
    is squeezed and its cells cut ("prefill-…"). Here a non-terminal is ``PIPE_WIDTH`` wide
    (tables never expand, so each keeps its natural width) and rules stay ``RULE_WIDTH``.
    A terminal, an explicit ``width`` and the ``COLUMNS`` variable keep rich's behaviour.
    """

    def _pipe(self) -> bool:
        return self._width is None and "COLUMNS" not in self._environ and not self.is_terminal

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return ConsoleDimensions(PIPE_WIDTH, size.height) if self._pipe() else size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)

    def rule(self, title: object = "", **kwargs: object) -> None:
        from rich.rule import Rule

        width = None
        if self._pipe():
            width = max(RULE_WIDTH, len(Text.from_markup(title) if isinstance(title, str) else title) + 8)
        self.print(Rule(title=title, **kwargs), width=width)


console = CliConsole(stderr=False)
err_console = CliConsole(stderr=True)

ConfigOption = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. seed=3 mmlu.n=50")]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def friendly_errors(fn: Callable[[], object]) -> object:
    """Run ``fn``; expected user errors print one red line and exit 2 instead of a traceback."""
    from shared.config import ConfigError

    expected: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, KeyError, ValueError)
    try:
        from shared.models import ModelLoadError

        expected += (ModelLoadError,)
    except ImportError:  # pragma: no cover - shared.models always imports
        pass
    try:
        return fn()
    except expected as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        err_console.print(f"[bold red]error:[/] {escape(str(message))}")  # "[h6_mean]" is text, not markup
        raise typer.Exit(code=2) from exc


def run_app(app: typer.Typer, argv: list[str] | None, prog_name: str) -> int:
    """Run a typer app as ``main(argv)`` would: returns the exit code instead of exiting."""
    try:
        # standalone_mode=False: click returns a typer.Exit's code instead of exiting
        result = app(args=list(sys.argv[1:] if argv is None else argv), prog_name=prog_name, standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        return 130
    except Exception as exc:
        # click's usage errors (typer vendors its own click, so match by shape, not class)
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        raise
    return result if isinstance(result, int) else 0
