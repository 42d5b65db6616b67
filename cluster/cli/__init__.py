"""``prefill-router``: one command line over every stage.

Each sub-command is a module with ``main(argv=None)``; this root only dispatches, and
imports a stage's module when that stage runs, so ``--help`` stays fast and no heavy
library (torch, ray) is imported by a command that does not need it.
"""

from __future__ import annotations

import importlib
import sys

import typer

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("training.data.build", "Build the query table from offline sources, or import one with its labels."),
    "models": ("shared.model_cmd", "List the model registry; download/convert and time model loads."),
    "label": ("training.label.run", "Label every target's correctness per query; judge logged answers (Ray Data)."),
    "capture": ("training.capture.run", "Capture the encoder's prefill activations (Ray Data)."),
    "probe": ("training.fit.probe", "Layer probes: Fisher J, d_eff and linear-probe AUC per layer."),
    "tune": ("training.fit.tune", "Choose the trunk's blocks and PCA size by cross-validation on train + val."),
    "fit": ("training.fit.run", "Fit SharedTrunkNet on Ray Train and write a router artifact."),
    "adapt": ("training.adapt.run", "Fine-tune the encoder's top blocks on the routing labels -> a router artifact."),
    "evaluate": ("training.evaluate.run", "Evaluate a router artifact against oracle and baselines."),
    "serve": ("serving.app", "Run the Ray Serve routing application."),
    "cluster": ("cluster.local", "Start, stop and check a private local Ray head (start|stop|status)."),
    "submit": ("cluster.jobs", "Submit the retraining pipeline as a Ray job; status, logs, stop."),
    "pipeline": ("cluster.pipeline.run", "Retrain end to end: data, label, capture, probe, tune, fit, evaluate, publish."),
    "k8s": ("cluster.k8s", "Render and validate the KubeRay manifests; generate the RayService."),
    "demo": ("cluster.demo", "Run the whole system end to end on a local Ray cluster."),
}

PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def dispatch(name: str, argv: list[str]) -> int:
    """Import the stage module and run its ``main(argv)``."""
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        typer.secho(f"`prefill-router {name}` is not available in this version yet.", fg="red", err=True)
        return 2
    return int(module.main(argv) or 0)


def _make_command(name: str, help_text: str):
    def command(ctx: typer.Context) -> None:
        raise typer.Exit(code=dispatch(name, list(ctx.args)))

    command.__doc__ = help_text
    command.__name__ = f"cmd_{name}"
    return command


def make_app() -> typer.Typer:
    app = typer.Typer(
        help="prefill-router: route each prompt to the cheapest LLM that will answer it correctly.",
        no_args_is_help=True,
        add_completion=False,
    )
    for name, (_, help_text) in COMMANDS.items():
        app.command(name, context_settings=PASSTHROUGH, help=help_text)(_make_command(name, help_text))
    return app


def main(argv: list[str] | None = None) -> int:
    from shared.cli_utils import run_app

    code = run_app(make_app(), sys.argv[1:] if argv is None else argv, "prefill-router")
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
