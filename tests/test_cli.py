import shutil
import subprocess
import sys

from shared.cli import COMMANDS, main


def test_console_script_lists_every_subcommand():
    exe = shutil.which("prefill-router") or str(__import__("pathlib").Path(sys.executable).parent / "prefill-router")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
    for name in ("data", "label", "capture", "probe", "fit", "evaluate", "serve", "submit", "demo"):
        assert name in out


def test_every_command_dispatches_to_a_main():
    assert set(COMMANDS) >= {"data", "label", "capture", "probe", "fit", "evaluate", "serve", "submit", "demo"}
    assert main(["data", "--help"]) == 0
    assert main(["no-such-command"]) == 2
