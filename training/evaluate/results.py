"""What ``prefill-router evaluate`` works on and returns, as types: the rows it evaluates
(:class:`EvalRows`, each row's :class:`RowMeta`) and the report, :class:`EvalReport`: what
:func:`training.evaluate.run.run_evaluation` returns and writes as ``report.json``
(:meth:`EvalReport.json_text`), and what readers of that file load (:meth:`EvalReport.read`: the
demo; the pipeline's publish step reads the returned one).

Field order is the order of ``report.json``. A metric that is undefined (``nan``: e.g. the gap
closed when the oracle is no better than the best single model) stays ``nan`` in memory and is
written as ``null``, so a report read back holds ``None`` there (:data:`Metric`). Keys an older
report lacks load as unset and are written back absent (``exclude_unset``), so a committed
report round-trips to the same JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.evaluate.off_policy_eval import OffPolicyReport

if TYPE_CHECKING:
    from training.dataset import RoutingData

Metric = float | None  # nan in memory, null on disk and when read back


def jsonable(obj: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN / inf to ``null``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------ the rows evaluated
@dataclass
class RowMeta:
    """Per row of the evaluated data: its prompt text, task and source ("" where unknown)."""

    text: list[str]
    task: list[str]
    source: list[str]

    @classmethod
    def blank(cls, n: int) -> "RowMeta":
        return cls([""] * n, [""] * n, [""] * n)

    def __add__(self, other: "RowMeta") -> "RowMeta":
        return RowMeta(self.text + other.text, self.task + other.task, self.source + other.source)


@dataclass
class EvalRows:
    """The rows to evaluate (train / val / test), each row's meta (None without a query table) and
    whether every row of the evaluated table is scored as test."""

    data: RoutingData
    meta: RowMeta | None
    all_rows_test: bool


# ------------------------------------------------------------------------------ the report
class Result(BaseModel):
    """A part of the report: every key known (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")


class Curve(Result):
    """Points of a cost-accuracy curve (the single-model hull, a policy's Pareto front)."""

    cost: list[Metric]
    accuracy: list[Metric]


class SingleModel(Result):
    """One target always chosen."""

    accuracy: Metric
    cost: Metric
    iso_accuracy_savings: Metric = None
    best_gap_closed_at_savings: Metric = None
    task_averaged_accuracy: Metric = None


class TargetPoint(Result):
    """A named target's accuracy and mean cost (best single, cheapest, most expensive; under
    ``best_single_task_averaged``, ``accuracy`` is the task-averaged one)."""

    target: str
    accuracy: Metric
    cost: Metric


class Oracle(Result):
    """The best target for every query (cheapest among the correct ones)."""

    accuracy: Metric
    cost: Metric
    cost_savings: Metric
    iso_accuracy_savings: Metric = None
    best_gap_closed_at_savings: Metric = None
    task_averaged_accuracy: Metric = None


class References(Result):
    """What the routers of a subset are measured against."""

    n: int
    n_all_labelled: int | None = None  # rows every target labelled (the others count on their present labels)
    single: dict[str, SingleModel]
    best_single: TargetPoint
    cheapest: TargetPoint
    most_expensive: TargetPoint
    oracle: Oracle
    hull: Curve
    zero_router_pauccc: Metric
    zero_router_gap_at_savings: Metric = None
    equal_costs: bool | None = None  # every target costs the same per query: accuracy is the headline
    n_tasks: int | None = None  # tasks of the task-averaged accuracy (None: no task column)
    best_single_task_averaged: TargetPoint | None = None


class Candidate(Result):
    """One policy calibrated on val for the operating point."""

    policy: str
    param: float
    status: Literal["calibrated", "fallback"]
    val_accuracy: Metric
    val_cost: Metric


class ChosenOperatingPoint(Result):
    """The routing rule chosen on val: ``policy`` and its parameter under the policy's own name
    (the other policies' keys None). Extra keys are the parameters of policies added later."""

    model_config = ConfigDict(extra="allow")

    policy: str
    tolerance: float | None = None
    value: float | None = None
    status: Literal["calibrated", "fallback", "default"]
    target_cost: float | None = None
    target_accuracy: float | None = None
    val_accuracy: Metric = None
    val_cost: Metric = None
    note: str | None = None
    candidates: list[Candidate] | None = None

    @property
    def param(self) -> float:
        """The chosen policy's parameter."""
        return getattr(self, self.policy)


class CandidatePoint(Result):
    """A policy calibrated on val for the operating point, routed with its parameter on the subset."""

    param: float
    status: Literal["calibrated", "fallback"]
    accuracy: Metric
    cost: Metric
    gap_closed: Metric
    cost_savings: Metric


class Sweep(Result):
    """The tolerance policy's points, from the tolerance 0 up."""

    tolerance: list[Metric]
    accuracy: list[Metric]
    cost: list[Metric]


class Frontier(Result):
    """A policy's frontier metrics over its whole sweep."""

    pauccc: Metric
    max_gap_closed: Metric
    iso_accuracy_savings: Metric = None
    best_gap_closed_at_savings: Metric = None
    frontier: Curve | None = None  # Pareto corners (not in the per-task rows)


class FixedScores(Result):
    """A router that makes one choice (or one mix of choices) whatever the query."""

    kind: Literal["fixed"]
    accuracy: Metric
    cost: Metric
    gap_closed: Metric
    cost_savings: Metric
    pauccc: Metric
    task_averaged_accuracy: Metric = None  # RouterDC's metric (not in the per-task rows)
    task_averaged_gap_closed: Metric = None
    iso_accuracy_savings: Metric = None
    best_gap_closed_at_savings: Metric = None


class ProbabilisticScores(Result):
    """A router predicting P(correct) per target, at its operating point and along its sweeps. A policy
    registered after the two shipped ones adds its frontier as ``<name>_policy`` (the only extra keys)."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["probabilistic"]
    policy: str
    param: float
    accuracy: Metric
    cost: Metric
    gap_closed: Metric
    cost_savings: Metric
    pauccc: Metric
    task_averaged_accuracy: Metric = None  # RouterDC's metric (not in the per-task rows)
    task_averaged_gap_closed: Metric = None
    max_gap_closed: Metric
    iso_accuracy_savings: Metric = None
    best_gap_closed_at_savings: Metric = None
    cost_savings_at_best_single_accuracy: Metric
    auc: dict[str, Metric]
    brier: dict[str, Metric]
    mean_auc: Metric
    mean_brier: Metric
    value_policy: Frontier | None = None
    sweep: Sweep | None = None  # not in the per-task rows
    operating_point: ChosenOperatingPoint | None = None  # not in the per-task rows
    candidate_points: dict[str, CandidatePoint] | None = None  # per policy calibrated on val; not per task


    @model_validator(mode="after")
    def _registered_policy_frontiers(self) -> "ProbabilisticScores":
        from shared.policy import policy_names

        extra = self.__pydantic_extra__ or {}
        for key, value in extra.items():
            if not (key.endswith("_policy") and key.removesuffix("_policy") in policy_names()):
                raise ValueError(f"{key}: not a field of a router's scores, nor a registered policy's frontier")
            extra[key] = Frontier.model_validate(value)
        return self


RouterScores = Annotated[FixedScores | ProbabilisticScores, Field(discriminator="kind")]


class SubsetScores(Result):
    """Every router on one subset of the test rows, with that subset's references."""

    references: References
    routers: dict[str, RouterScores]


class SplitCounts(Result):
    train: int
    val: int
    test: int
    test_disagreement: int


class PolicyPoint(Result):
    """A val-chosen operating point of one policy, applied to test."""

    param: float
    accuracy: Metric
    cost: Metric
    savings_vs_best_single: Metric


class PolicyPoints(Result):
    """Per probabilistic router and policy: the cheapest val point reaching the best single model's val
    accuracy, on test (None: not reached on val). Empty without val rows."""

    target_val_accuracy: Metric = None
    routers: dict[str, dict[str, PolicyPoint | None]] = Field(default_factory=dict)


class PointInterval(Result):
    """The artifact's operating point on test: ``[value, low, high]`` (95% bootstrap)."""

    accuracy: list[Metric]
    accuracy_minus_best: list[Metric]
    cost_savings: list[Metric]


class TaskAveragedInterval(Result):
    """The artifact's operating point on test in task-averaged accuracy, and its differences from
    the best single target (by task-averaged accuracy) and the task-aware reference: ``[value,
    low, high]`` (95% bootstrap, queries redrawn within each task)."""

    n_tasks: int
    accuracy: list[Metric]
    best_single: str
    minus_best_single: list[Metric]
    minus_task_best: list[Metric] | None = None


class PublishedFigure(Result):
    """A published result drawn as a fixed reference (a row of the report, a line on the plot);
    figures are fractions (0.527 for 52.70%), measured on the publication's own split."""

    label: str = Field(description="What the figure is, e.g. 'RouterDC (in distribution)'.")
    task_averaged_accuracy: float | None = Field(None, ge=0, le=1, description="Its task-averaged accuracy.")
    accuracy: float | None = Field(None, ge=0, le=1, description="Its pooled accuracy.")

    @model_validator(mode="after")
    def _a_figure(self) -> "PublishedFigure":
        if self.task_averaged_accuracy is None and self.accuracy is None:
            raise ValueError(f"published figure {self.label!r}: give task_averaged_accuracy or accuracy")
        return self


class Margin(Result):
    """Our mean-AUC margin over a baseline with its paired-bootstrap interval."""

    margin: Metric
    low: Metric
    high: Metric
    p_le_zero: Metric


class WithinTaskAuc(Result):
    mean_auc: Metric
    auc: dict[str, Metric]


class PairwiseAuc(Result):
    """A router's pairwise AUC on test (:mod:`training.evaluate.pairwise`), pooled and per task."""

    mean: Metric
    by_task: dict[str, Metric] = Field(default_factory=dict)


class HeadroomRow(Result):
    """One task group's share of the test headroom over the best single target."""

    group: str
    n: int
    accuracy: dict[str, Metric]
    oracle: Metric
    headroom_share: Metric


class EvalReport(Result):
    """``report.json``: every number of one evaluation."""

    targets: list[str]
    n: SplitCounts
    disagreement_share: Metric
    operating_point: ChosenOperatingPoint
    subsets: dict[str, SubsetScores]
    by_task: dict[str, dict[str, SubsetScores]] = Field(default_factory=dict)
    savings_threshold: float | None = None
    policy_operating_points: PolicyPoints | None = None
    operating_point_interval: PointInterval | None = None
    task_averaged_interval: TaskAveragedInterval | None = None
    auc_margin: dict[str, Margin] | None = None
    within_task_auc: dict[str, WithinTaskAuc] | None = None
    auc_margin_within_task: dict[str, Margin] | None = None
    pairwise_auc: dict[str, PairwiseAuc] | None = None
    pairwise_margin: dict[str, Margin] | None = None
    headroom_by_task: list[HeadroomRow] | None = None
    off_policy: OffPolicyReport | None = None  # labels from a decision log (training.evaluate.off_policy_eval)
    all_rows_test: bool | None = None
    skipped_routers: dict[str, str] | None = None
    artifact_baselines: dict[str, str] | None = None  # baseline -> where its target came from (no train rows)
    semantic_text: dict[str, Any] | None = None
    operating_point_written: bool | None = None
    novelty: dict[str, Any] | None = None  # training.evaluate.novelty_gate.gate_summary: the gate, test rows it took
    artifact: str | None = None
    config: dict[str, Any] | None = None
    paper: dict[str, float] | None = None
    published: list[PublishedFigure] | None = None

    @classmethod
    def read(cls, uri: str) -> "EvalReport":
        """A ``report.json`` (local or s3://)."""
        from shared import storage

        return cls.model_validate(storage.read_json(uri))

    def router(self, name: str, subset: str = "test") -> FixedScores | ProbabilisticScores:
        return self.subsets[subset].routers[name]

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON values (``nan`` as None), keys in file order."""
        return jsonable(self.model_dump(exclude_unset=True))

    def json_text(self) -> str:
        """The text of ``report.json``."""
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
