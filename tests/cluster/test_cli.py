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

    from shared.cli_utils import friendly_errors

    def fail():
        raise ValueError("unknown blocks [h8_last]; see [type=value_error, input_value={'a': [1]}]")

    with pytest.raises(typer.Exit) as exc:
        friendly_errors(fail)
    assert exc.value.exit_code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown blocks [h8_last]; see [type=value_error, input_value={'a': [1]}]" in err
