import shutil
import subprocess
import sys

from cluster.cli import COMMANDS, main


def test_console_script_lists_every_subcommand():
    exe = shutil.which("prefill-router") or str(__import__("pathlib").Path(sys.executable).parent / "prefill-router")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
    for name in ("data", "label", "capture", "probe", "fit", "evaluate", "serve", "submit", "demo"):
        assert name in out


def test_every_command_dispatches_to_a_main():
    assert set(COMMANDS) >= {"data", "label", "capture", "probe", "fit", "evaluate", "serve", "submit", "demo"}
    assert main(["data", "--help"]) == 0
    assert main(["no-such-command"]) == 2


def test_error_messages_keep_their_brackets(capsys):
    """A reason such as "fit.blocks=[h8_last]" or pydantic's "[type=value_error, ...]" is
    printed as text: rich would take "[h8_last]" for a markup tag and drop it."""
    import pytest
    import typer

    from shared.cli_utils import user_errors
    from shared.errors import BadInput

    def fail():
        raise BadInput("unknown blocks [h8_last]; see [type=value_error, input_value={'a': [1]}]")

    with pytest.raises(typer.Exit) as exc:
        user_errors(fail)()
    assert exc.value.exit_code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown blocks [h8_last]; see [type=value_error, input_value={'a': [1]}]" in err


def test_a_user_error_is_one_line_and_exit_2_anything_else_keeps_its_traceback(capsys):
    """The boundary of every command: a UserError (here a KeyError-like unknown name) prints
    its message as written, without the quotes a KeyError adds, and exits 2; a plain
    ValueError or KeyError is a bug and reaches the caller with its traceback."""
    import pytest

    from shared.cli_utils import run_cli
    from shared.errors import UnknownName

    def lookup(name: str) -> None:
        if name == "bug":
            raise KeyError("a bug, not the user's")
        raise UnknownName(f"no overlay {name!r}; available: dev-cpu (or base)")

    def bad_value() -> None:
        raise ValueError("also a bug")

    commands = {"lookup": lookup, "bad": bad_value}
    assert run_cli("prog", ["lookup", "nope"], commands, "A group.", logs=False) == 2
    assert " ".join(capsys.readouterr().err.split()) == "error: no overlay 'nope'; available: dev-cpu (or base)"
    with pytest.raises(KeyError, match="a bug"):
        run_cli("prog", ["lookup", "bug"], commands, "A group.", logs=False)
    with pytest.raises(ValueError, match="also a bug"):
        run_cli("prog", ["bad"], commands, "A group.", logs=False)


def test_a_group_of_one_command_stays_a_group(capsys):
    from shared.cli_utils import run_cli

    ran = []

    def run() -> None:
        """Run it."""
        ran.append(1)

    assert run_cli("prog", [], {"run": run}, "The group's help.", logs=False) == 2  # no_args_is_help
    assert "The group's help." in capsys.readouterr().out
    assert run_cli("prog", ["run"], {"run": run}, "The group's help.", logs=False) == 0 and ran == [1]
