"""What ``prefill-router demo`` returns and writes (``workdir/demo-summary.json``), as types:
:class:`DemoSummary`, with the serving step's :class:`ServeResult` (:func:`cluster.demo_chat.serve_and_chat`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
