"""``prefill-router submit``: the retraining pipeline as a Ray job (``run``, ``status``, ``logs``, ``stop``).

``run <config> [key=value ...]`` first validates the pipeline config on this machine,
exactly as the job will load it (unknown keys, the query table, every target and the
encoder in the registry, a reload's serve config, paths the upload would leave out) and
submits **nothing** when it is invalid (exit 2). It then submits
``<python> -m cluster.cli pipeline run --config <config> <overrides>`` through the Ray
Jobs API (``JobSubmissionClient``), follows the job's logs and exits with its outcome:
0 on SUCCEEDED, 1 on FAILED or STOPPED.

Runtime env: ``working_dir`` is this repository (without ``.venv``, ``runs``, ``.git``,
caches and big data files, see :data:`EXCLUDES`; Ray also honours ``.gitignore``),
``env_vars`` pass through this shell's ``AWS_*``, ``RAY_*``, ``PREFILL_ROUTER_*`` and
``HF_*`` settings (minus the ones that name this client's own Ray session, and minus
secrets: names with SECRET, TOKEN, PASSWORD or CREDENTIAL) plus any ``--env KEY=VALUE``,
and ``--pip`` adds packages. Env vars of a job are shown in the cluster's dashboard, so
secrets stay out unless ``--pass-secrets`` says otherwise: give credentials to the nodes
instead (the KubeRay manifests take them from a Secret; a local head started from a shell
that has them passes them to every Ray process).

Address: ``--address``, else the dashboard of the cluster recorded by ``prefill-router
cluster start`` (``--state-file``), else ``http://127.0.0.1:8265``. The job runs in a copy
of the repository: relative paths in the config resolve inside that copy, so give
``work_dir`` and a local ``publish.uri`` as absolute paths (a cluster on this machine) or
use ``s3://`` for what must outlive the job.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional
from urllib.parse import urlparse

import typer

from shared.cli_utils import Overrides
from shared.errors import BadInput

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_STATE_FILE = "runs/cluster/local.json"
EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", "*.pyc",
            "data/**/*.parquet", "data/**/*.safetensors", "data/**/*.gguf", "data/**/*.bin"]
PASS_PREFIXES = ("AWS_", "RAY_", "PREFILL_ROUTER_", "HF_")
NOT_PASSED = {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_TMPDIR", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
              "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_RAYLET_PID"}
NOT_PASSED_PREFIXES = ("RAY_JOB_", "RAY_RUNTIME_ENV", "RAY_NODE_", "RAY_CLIENT_")
SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class SubmitError(BadInput):
    """The job cannot be submitted as asked; the message says why (exit 2)."""


# --------------------------------------------------------------------------- checks before submitting
def _excluder():
    """``match(relative path) -> bool``: what the upload leaves out (EXCLUDES + .gitignore)."""
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray's packaging uses

    lines = list(EXCLUDES)
    gitignore = ROOT / ".gitignore"
    if gitignore.is_file():
        lines += gitignore.read_text().splitlines()
    return PathSpec.from_lines("gitwildmatch", lines).match_file


def upload_path(path: str, what: str, match=None) -> str | None:
    """``path`` relative to the repository when it is uploaded with the job; None for s3:// or an
    absolute path outside the repository; raises when the upload would leave it out."""
    if path.startswith("s3://"):
        return None
    p = Path(path).expanduser()
    full = (p if p.is_absolute() else ROOT / p).resolve()
    try:
        rel = full.relative_to(ROOT).as_posix()
    except ValueError:
        if not p.is_absolute():
            raise SubmitError(f"{what} {path} points outside the repository; use an absolute path") from None
        return None
    if (match or _excluder())(rel):
        raise SubmitError(f"{what} {path} is not uploaded with the job (it matches the upload's excludes "
                          f"or .gitignore); use an absolute path on a cluster on this machine, or s3://")
    return rel


def validate_job(config: str, overrides: list[str]) -> tuple[Any, str, list[str]]:
    """Load and check the pipeline config as the job will; returns (config, its path in the upload, warnings)."""
    from shared.config import load_config
    from cluster.pipeline.config import PipelineConfig
    from cluster.pipeline.state import check_pipeline

    cfg = load_config(PipelineConfig, config, overrides)
    check_pipeline(cfg, base=ROOT)  # the job runs in (a copy of) the repository
    match = _excluder()
    rel_config = upload_path(str(Path(config).resolve()), "the config", match)
    if rel_config is None:
        raise SubmitError(f"the config {config} must be inside the repository {ROOT}: the job reads it from "
                          "its uploaded copy")
    inputs = [(path, "data_import.inputs") for path in (cfg.data_import.inputs if cfg.data_import else [])]
    for path, what in ((cfg.queries, "queries"), (cfg.labels, "labels"), (cfg.registry, "registry"),
                       (cfg.publish.reload_serve_app and cfg.publish.reload_serve_app.serve_config,
                        "publish.reload_serve_app.serve_config"), *inputs):
        if path:
            upload_path(path, what, match)
    warnings = [f"{what} {path} is relative: in the job it resolves inside the uploaded copy of the repository "
                "and is lost with it; give an absolute path or s3://"
                for path, what in ((cfg.work_dir, "work_dir"), (cfg.publish.uri, "publish.uri"))
                if path and not path.startswith("s3://") and not Path(path).expanduser().is_absolute()]
    return cfg, rel_config, warnings


# --------------------------------------------------------------------------- the job
def resolve_address(address: str | None, state_file: str | None) -> tuple[str, dict[str, str]]:
    """Jobs API URL and request headers (a bearer token for a token-auth local cluster)."""
    from cluster.local_state import auth_headers, read_state

    headers: dict[str, str] = {}
    if not address and state_file and Path(state_file).is_file():
        state = read_state(state_file)
        address = state["dashboard_url"]
        headers = auth_headers(state.get("auth_token_path"))
    address = address or DEFAULT_ADDRESS
    return (address if "://" in address else f"http://{address}"), headers


def is_secret(name: str) -> bool:
    return any(marker in name.upper() for marker in SECRET_MARKERS)


def runtime_env(pip: list[str], env: list[str], pass_env: bool = True, pass_secrets: bool = False) -> dict[str, Any]:
    """The job's runtime env: this repository, passed-through env vars (no secrets unless asked), pip extras."""
    env_vars = {k: v for k, v in os.environ.items()
                if pass_env and k.startswith(PASS_PREFIXES) and k not in NOT_PASSED
                and not k.startswith(NOT_PASSED_PREFIXES) and (pass_secrets or not is_secret(k))}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r} is not KEY=VALUE")
        env_vars[key] = value
    out: dict[str, Any] = {"working_dir": str(ROOT), "excludes": list(EXCLUDES), "env_vars": env_vars}
    if pip:
        out["pip"] = list(pip)
    return out


def entrypoint(python: str, rel_config: str, overrides: list[str]) -> str:
    return shlex.join([python, "-m", "cluster.cli", "pipeline", "run", "--config", rel_config, *overrides])


def default_python(url: str) -> str:
    """This interpreter for a cluster on this machine (same venv); ``python`` on the image otherwise."""
    return sys.executable if urlparse(url).hostname in LOOPBACK_HOSTS else "python"


def connect(address: str | None, state_file: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    url, headers = resolve_address(address, state_file)
    try:
        return JobSubmissionClient(url, headers=headers or None)
    except (ConnectionError, RuntimeError, OSError) as exc:
        raise SubmitError(f"cannot reach the Ray jobs API at {url} ({str(exc).splitlines()[0]}); start a cluster "
                          "with `prefill-router cluster start` or pass --address") from exc


async def _tail(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def follow(client: Any, job_id: str, poll_s: float = 2.0) -> str:
    """Print the job's logs as they come; returns its terminal status."""
    try:
        asyncio.run(_tail(client, job_id))
    except Exception as exc:  # noqa: BLE001 - the log stream broke: fall back to polling the status
        print(f"[log stream ended: {exc}; polling the job status]", file=sys.stderr)
    while (status := str(client.get_job_status(job_id)).rsplit(".", 1)[-1]) not in TERMINAL:
        time.sleep(poll_s)
    return status


# --------------------------------------------------------------------------- CLI
AddressOption = Annotated[Optional[str], typer.Option(
    "--address", help=f"Ray dashboard / jobs API URL (default: the state file's cluster, else {DEFAULT_ADDRESS}).")]
StateOption = Annotated[str, typer.Option("--state-file", help="State file of `prefill-router cluster start`.")]


def _run(
    config: Annotated[str, typer.Argument(help="Pipeline config YAML inside the repository.")],
    overrides: Overrides = None,
    address: AddressOption = None,
    state_file: StateOption = DEFAULT_STATE_FILE,
    pip: Annotated[Optional[list[str]], typer.Option("--pip", help="Extra pip package for the job (repeat).")] = None,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="Extra KEY=VALUE env var (repeat).")] = None,
    pass_env: Annotated[bool, typer.Option("--pass-env/--no-pass-env", help="Pass AWS_*, RAY_*, ... through.")] = True,
    pass_secrets: Annotated[bool, typer.Option("--pass-secrets", help="Also pass secrets (e.g. AWS_SECRET_ACCESS_KEY);"
                                               " the dashboard shows them.")] = False,
    python: Annotated[Optional[str], typer.Option("--python", help="Interpreter of the entrypoint (default: this "
                                                  "one for a loopback cluster, else `python`).")] = None,
    submission_id: Annotated[Optional[str], typer.Option("--submission-id", help="Job id to use.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the logs until the job ends.")] = True,
) -> None:
    """Validate a pipeline config, submit it as a Ray job, follow its logs; exit 0 on success."""
    from shared.cli_utils import console, err_console

    overrides = overrides or []
    _, rel_config, warnings = validate_job(config, overrides)  # nothing is submitted if this raises
    for line in warnings:
        err_console.print(f"[yellow]warning:[/] {line}")
    client = connect(address, state_file)
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint(python or default_python(client.get_address()), rel_config, overrides),
            runtime_env=runtime_env(pip or [], env or [], pass_env, pass_secrets), submission_id=submission_id,
            metadata={"tool": "prefill-router submit", "config": rel_config})
    except RuntimeError as exc:  # the jobs API refused it (a used submission id, a bad runtime env)
        raise SubmitError(f"the cluster refused the job: {str(exc).splitlines()[0]}") from exc
    console.print(f"[green]submitted[/] {job_id} to {client.get_address()}; "
                  f"status: prefill-router submit status {job_id}")
    if not wait:
        return
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        err_console.print(f"stopped following; the job keeps running (prefill-router submit stop {job_id})")
        raise typer.Exit(code=130)
    (console if status == "SUCCEEDED" else err_console).print(f"job {job_id}: {status}")
    raise typer.Exit(code=TERMINAL[status])


def _status(job_id: Annotated[str, typer.Argument(help="Submission id.")], address: AddressOption = None,
            state_file: StateOption = DEFAULT_STATE_FILE) -> None:
    """Print a job's status; exit 1 when it FAILED or was STOPPED."""
    from shared.cli_utils import console

    info = _call(connect(address, state_file).get_job_info, job_id)
    status = str(info.status).rsplit(".", 1)[-1]
    console.print(f"{job_id}: {status}" + (f" ({info.message})" if info.message else ""))
    raise typer.Exit(code=TERMINAL.get(status, 0))


def _logs(job_id: Annotated[str, typer.Argument(help="Submission id.")], address: AddressOption = None,
          state_file: StateOption = DEFAULT_STATE_FILE,
          tail: Annotated[bool, typer.Option("--follow/--no-follow", help="Follow until the job ends.")] = False,
          ) -> None:
    """Print a job's logs (all so far, or follow them)."""
    client = connect(address, state_file)
    if tail:
        raise typer.Exit(code=TERMINAL.get(follow(client, job_id), 0))
    print(_call(client.get_job_logs, job_id), end="")


def _stop(job_id: Annotated[str, typer.Argument(help="Submission id.")], address: AddressOption = None,
          state_file: StateOption = DEFAULT_STATE_FILE) -> None:
    """Ask a running job to stop."""
    from shared.cli_utils import console

    stopped = _call(connect(address, state_file).stop_job, job_id)
    console.print(f"{job_id}: stop requested" if stopped else f"{job_id}: not running (nothing to stop)")


def _call(fn, job_id: str) -> Any:
    """A jobs API call; an unknown job id (Ray raises RuntimeError) becomes a one-line error."""
    try:
        return fn(job_id)
    except RuntimeError as exc:
        raise SubmitError(f"job {job_id}: {str(exc).splitlines()[0]}") from exc


def main(argv: list[str] | None = None) -> int:
    from shared.cli_utils import run_cli

    return run_cli("prefill-router submit", argv, {"run": _run, "status": _status, "logs": _logs, "stop": _stop},
                   "The retraining pipeline as a Ray job.")


if __name__ == "__main__":
    raise SystemExit(main())
