"""What ``prefill-router demo`` returns and writes (``workdir/demo-summary.json``), as types:
:class:`DemoSummary`, with the serving step's :class:`ServeResult` (:func:`cluster.demo_chat.serve_and_chat`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# The shipped routers on real targets, whose committed reports the demo's summary quotes.
SHIPPED = {"RouterBench (11 production LLMs)": "data/routerbench/eval/report.json",
           "RouterDC (7 open 7B-8B models)": "data/routerdc/eval/report.json"}


class ServeResult(BaseModel):
    """What :func:`serve_and_chat` did: the app it deployed and each chat request sent through it."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="The app's HTTP address.")
    targets: list[str] = Field(description="The targets it served.")
    not_served: dict[str, str] = Field(description="The artifact's other targets, each with why it was left out.")
    startup_s: float = Field(description="Seconds from serve.start to the app answering /readyz.")
    chats: list[dict[str, Any]] = Field(description="Per prompt: the prompt (query_id, task, messages) and its "
                                        "routing (chat: target, answer, probabilities, policy, timings).")
    median_overhead_ms: float | None = Field(description="Median router overhead over the chats (None: no chats).")


class DemoSummary(BaseModel):
    """``workdir/demo-summary.json``: what one demo run did, where its files are and the router's test numbers."""

    model_config = ConfigDict(extra="forbid")

    workdir: str = Field(description="Where the demo kept what it made.")
    quick: bool = Field(description="The quick demo (smaller sample, smaller router).")
    reference_labels: str = Field(description="The labels reused (\"\": a fresh table was labelled).")
    seconds: dict[str, float] = Field(description="Seconds per demo step, and the total.")
    files: dict[str, str] = Field(description="What to look at: report, plots, artifact, this summary.")
    stages: dict[str, dict[str, Any]] = Field(description="Each pipeline stage's result (pipeline-summary.json).")
    serve: ServeResult = Field(description="The Serve app and the chat requests sent through it.")
    test_metrics: dict[str, float] = Field(description="The router's headline numbers on the test split.")
    shipped: dict[str, str] = Field(default_factory=dict, description="What the shipped routers reach on real "
                                    "targets, read from their committed reports (benchmark -> one line).")


def shipped_line(report: Any) -> str:
    """One line of what a shipped router reaches on its test split (an :class:`EvalReport`):
    accuracy and savings against the best single model where prices differ; task-averaged
    accuracy against the best single model, the task-aware reference and a published figure
    where every target costs the same."""
    test = report.subsets["test"]
    ours, refs = test.routers["prefill-router"], test.references
    if not refs.equal_costs:
        best = refs.best_single
        return (f"router {ours.accuracy:.2%} at {ours.cost_savings:.1%} lower cost than {refs.most_expensive.target}; "
                f"best single {best.target} {best.accuracy:.2%}, oracle {refs.oracle.accuracy:.2%}")
    best, task = refs.best_single_task_averaged, test.routers.get("task-best")
    line = (f"router {ours.task_averaged_accuracy:.2%} task-averaged; best single {best.target} {best.accuracy:.2%}"
            + (f", task-aware {task.task_averaged_accuracy:.2%}" if task is not None else ""))
    return line + "".join(f", {p.label} {p.task_averaged_accuracy:.2%}" for p in report.published or []
                          if p.task_averaged_accuracy is not None)


def shipped_results(root: Path) -> dict[str, str]:
    """``{benchmark: line}`` from the committed reports under ``root`` (absent ones say so)."""
    from training.evaluate.results import EvalReport

    out = {}
    for name, rel in SHIPPED.items():
        path = root / rel
        out[name] = shipped_line(EvalReport.read(str(path))) if path.is_file() else f"no report at {rel}"
    return out
