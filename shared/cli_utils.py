"""Small helpers every sub-command uses: its app and error boundary, config options, the console."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.text import Text

from shared.errors import UserError

PIPE_WIDTH = 10_000  # wider than any table: a table does not expand, so it keeps its natural width
RULE_WIDTH = 80  # a rule fills the width: in a log or pipe it keeps a terminal's usual width
T = TypeVar("T")


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


def user_errors(command: Callable[..., T]) -> Callable[..., T]:
    """The error boundary of a CLI command: a :class:`UserError` prints one red line and exits 2.

    Any other exception is a bug and keeps its traceback. :func:`command_app` puts every
    command inside this boundary; a command never needs to catch a user error itself.
    """

    @functools.wraps(command)
    def boundary(*args: Any, **kwargs: Any) -> T:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")  # "[h6_mean]" is text, not markup
            raise typer.Exit(code=2) from exc

    return boundary


def config_command(config_class: type, run: Callable[[Any], Any], doc: str) -> Callable[..., None]:
    """A command ``[-c CONFIG] [key=value ...]`` that loads ``config_class`` and calls ``run`` with it."""

    def command(config: ConfigOption = None, overrides: Overrides = None) -> None:
        from shared.config import load_config

        run(load_config(config_class, config, overrides or []))

    command.__doc__ = doc
    return command


def command_app(commands: Callable[..., Any] | dict[str, Callable[..., Any]], help: str | None = None) -> typer.Typer:
    """The typer app of a ``prefill-router`` sub-command, every command inside :func:`user_errors`.

    ``commands`` is either one function (the sub-command is that command, e.g. ``fit``) or a
    group ``{name: function}`` (e.g. ``cluster start|stop``) described by ``help``.
    """
    if callable(commands):
        app = typer.Typer(add_completion=False)
        app.command()(user_errors(commands))
        return app
    app = typer.Typer(help=help, no_args_is_help=True, add_completion=False)

    def group() -> None:
        """A callback makes the app a group, even of one command (`label run`); its help is ``help``."""

    group.__doc__ = help
    app.callback()(group)
    for name, command in commands.items():
        app.command(name)(user_errors(command))
    return app


def run_cli(prog_name: str, argv: list[str] | None, commands: Callable[..., Any] | dict[str, Callable[..., Any]],
            help: str | None = None, logs: bool = True) -> int:
    """A sub-command's ``main(argv)``: set up logging (unless ``logs=False``), run its :func:`command_app`."""
    if logs:
        setup_logging()
    return run_app(command_app(commands, help), argv, prog_name)


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


@contextlib.contextmanager
def exit_on_sigterm():
    """Turn SIGTERM into ``SystemExit(143)`` while a command runs, so a killed command still runs
    its ``finally`` blocks (Serve shut down and its replicas drained, a private Ray head stopped)."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
