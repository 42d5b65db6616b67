"""Off-policy evaluation in ``prefill-router evaluate``: the test split of a decision-log import.

Labels imported from the Serve app's decision log (``data import format=decision-log``) hold, per
query, a score only for the target(s) that answered it, with the propensity of that choice
(``RoutingData.propensity``). The classical metrics then count only the observed cells: a
router's accuracy over the queries where it picked the target that answered (unweighted replay,
biased toward the logging router's choices), and the "oracle" is the logging policy's own mean.
So, on such labels, ``evaluate`` adds :func:`score_off_policy` (``report.json``'s ``off_policy``,
:class:`OffPolicyReport`): every router's inverse-propensity (IPS, SNIPS), direct-method and
doubly robust estimates of its accuracy and cost on the test split, with bootstrap intervals
(:mod:`training.evaluate.off_policy`), beside the logging policy's own value; and it skips the
classical numbers that mean nothing there (:data:`SKIPPED`).

The reward model of DR / DM is each probabilistic router's own predicted P(correct); a fixed
router (random, always-X, task-best) borrows the prefill router's. The cost model is the price
model the policies route with (``Router.costs``). The router's choice is its routing at the
operating point chosen on val (as in the classical tables).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.config import StrictConfig
from training.evaluate.cells import num, pct

if TYPE_CHECKING:
    from training.dataset import RoutingData

Metric = float | None
DEFAULT_MAX_WEIGHT = 100.0
SKIPPED = {
    "disagreement": "a logged query has a score for the target that answered it only, so targets cannot be seen "
                    "to disagree on it: no disagreement subset",
    "operating_point_interval": "its bootstrap interval is of the replay accuracy (observed cells only, biased): "
                                "the off-policy intervals replace it",
    "task_averaged_interval": "likewise a replay figure: replaced by the off-policy intervals",
}


class OffPolicyConfig(StrictConfig):
    """Off-policy estimates on labels from a decision log (read only when the labels carry propensities)."""

    max_weight: float = Field(DEFAULT_MAX_WEIGHT, ge=1, description="Clip each inverse-propensity weight 1/p at "
                              "this, to bound the variance a rare exploration adds (biases IPS / DR down on the "
                              "clipped rows; the report counts them). Epsilon-greedy with epsilon 0.05 over 2 "
                              "candidates logs p = 0.025, 1/p = 40: not clipped by the default.")


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Estimates(_Result):
    """``[value, low, high]`` (95% bootstrap) per estimator; DM and DR need a reward / cost model."""

    ips: list[Metric]
    snips: list[Metric]
    dm: list[Metric] | None = None
    dr: list[Metric] | None = None


class RouterOffPolicy(_Result):
    """One router's off-policy estimates on the test split's logged rows."""

    accuracy: Estimates
    cost: Estimates
    reward_model: str  # whose P(correct) DR and DM use
    n_match: int  # logged rows where the router picks the logged target (or may: a mixed router)
    n_match_decisions: int
    effective_sample_size: Metric
    n_clipped: int


class LoggingPolicy(_Result):
    """What the log's own routing scored: mean label and cost over the rows the estimates use."""

    accuracy: list[Metric]
    cost: list[Metric]


class OffPolicyReport(_Result):
    """``report.json``'s ``off_policy``: present when the evaluated labels carry propensities."""

    split: str = "test"
    max_weight: float
    n_boot: int
    n_rows: int = Field(description="Labelled (query, target) cells of the split: logged rows.")
    n_without_propensity: int = Field(description="Rows excluded: their decisions had no propensity (pinned).")
    n_used: int
    n_decisions: int = Field(description="Logged decisions merged into the rows used (a row's weight).")
    logging_policy: LoggingPolicy
    routers: dict[str, RouterOffPolicy]
    skipped_metrics: dict[str, str] = Field(default_factory=dict)


def logged_rows(data: RoutingData) -> dict[str, np.ndarray]:
    """The labelled cells of ``data`` as logged rows: ``row`` (query index), ``action`` (target),
    ``reward``, ``cost``, ``propensity`` (NaN: none) and ``counts`` (decisions merged, at least 1)."""
    row, action = np.nonzero(~np.isnan(data.Y))
    counts = data.decisions[row, action] if data.decisions is not None else np.ones(len(row))
    return {"row": row, "action": action, "reward": data.Y[row, action], "cost": data.cost[row, action],
            "propensity": data.propensity[row, action], "counts": np.maximum(counts, 1.0)}


def score_off_policy(choices: dict[str, np.ndarray], proba: dict[str, np.ndarray], reference: str,
                     data: RoutingData, C_hat: np.ndarray, max_weight: float, n_boot: int) -> dict[str, Any]:
    """:class:`OffPolicyReport` fields for the split ``data`` (with propensities). ``choices``: per router
    its routing ``(n,)`` or choice weights ``(n, T)``; ``proba``: the probabilistic routers' P(correct)
    ``(n, T)``; ``reference``: the router whose predictions are the fixed routers' reward model;
    ``C_hat``: ``(n, T)`` the price model's costs."""
    from training.evaluate.off_policy import logging_policy_value, off_policy_estimates, policy_matrix

    log = logged_rows(data)
    rows, T = log["row"], len(data.targets)
    args = {k: log[k] for k in ("action", "reward", "cost", "propensity", "counts")}
    boot = max(n_boot, 0)
    routers = {}
    for name, choice in choices.items():
        model = name if name in proba else reference
        est = off_policy_estimates(policy_matrix(choice, T)[rows], Q=proba[model][rows], C_hat=C_hat[rows],
                                   max_weight=max_weight, n_boot=boot, **args)
        routers[name] = {"accuracy": est["accuracy"], "cost": est["cost"], "reward_model": model,
                         **{k: est[k] for k in ("n_match", "n_match_decisions", "effective_sample_size", "n_clipped")}}
    base = logging_policy_value(log["reward"], log["cost"], log["propensity"], log["counts"], n_boot=boot)
    kept = ~np.isnan(log["propensity"])
    return {"split": "test", "max_weight": float(max_weight), "n_boot": boot, "n_rows": int(len(rows)),
            "n_without_propensity": int((~kept).sum()), "n_used": int(kept.sum()), "n_decisions": base["n_decisions"],
            "logging_policy": {"accuracy": base["accuracy"], "cost": base["cost"]}, "routers": routers,
            "skipped_metrics": dict(SKIPPED)}


# ------------------------------------------------------------------------------ report.md
def _cell(v: list | None, cost: bool = False) -> str:
    """``value [low, high]`` (percent, or a cost with 3 significant digits); "—" where undefined."""
    if not v:
        return "—"
    fmt = (lambda x: num(x, ".3g")) if cost else pct
    return fmt(v[0]) + ("" if v[1] is None else f" [{fmt(v[1])}, {fmt(v[2])}]")


def off_policy_rows(off: dict[str, Any]) -> list[list[str]]:
    """The table's rows: the logging policy, then each router."""
    lp = off["logging_policy"]
    rows = [["logging policy (the log as served)", str(off["n_used"]), "—",
             _cell(lp["accuracy"]), "—", "—", _cell(lp["cost"], True), "—"]]
    for name, r in off["routers"].items():
        a, c = r["accuracy"], r["cost"]
        rows.append([name, f"{r['n_match']} ({r['n_match_decisions']} decisions)",
                     num(r["effective_sample_size"], ".1f"), _cell(a["ips"]), _cell(a.get("snips")),
                     _cell(a.get("dr")), _cell(c["ips"], True), _cell(c.get("dr"), True)])
    return rows


OFF_POLICY_COLUMNS = ("router", "logged rows matching", "effective sample size", "IPS accuracy", "SNIPS accuracy",
                      "DR accuracy", "IPS mean cost", "DR mean cost")


def off_policy_table(report: dict[str, Any]):
    """The off-policy table as a rich Table for the console (None without one)."""
    from training.evaluate.report_cells import rich_table

    off = report.get("off_policy")
    return None if not off else rich_table(f"off-policy estimates on the logged test traffic ({off['n_used']} rows; "
                                           "95% bootstrap)", OFF_POLICY_COLUMNS, off_policy_rows(off))


def off_policy_lines(report: dict[str, Any]) -> list[str]:
    """Markdown: the off-policy section (nothing when the labels carry no propensities)."""
    from training.evaluate.report_cells import md_table

    off = report.get("off_policy")
    if not off:
        return []
    clipped = {k: r["n_clipped"] for k, r in off["routers"].items() if r["n_clipped"]}
    return [
        "## Off-policy estimates (logged traffic)", "",
        "These labels come from the Serve app's decision log: each test query has a score only for the target "
        "that answered it, with the probability p that the logging router (with its exploration) sent it there. "
        "Each router's accuracy and mean cost had it routed this traffic are estimated from the logged rows where "
        "it picks the logged target, weighted by 1/p: IPS = mean(1[router = logged] · r / p); SNIPS divides by "
        "the sum of those weights instead of the row count; DR = mean(Q(router's choice) + 1[router = logged] / p "
        "· (r − Q(logged))), with Q the router's own predicted P(correct) (fixed routers: the prefill router's) "
        "and, for cost, the price model. IPS is unbiased when every target a router picks had p > 0; DR also "
        "when Q is right; on few rows IPS can leave [0, 1], SNIPS cannot. Intervals: 95% bootstrap over the "
        "logged rows.", "",
        f"Test split: {off['n_rows']} logged rows, {off['n_used']} used ({off['n_decisions']} decisions; a row "
        f"merging a prompt's repeated decisions weighs as many); {off['n_without_propensity']} without a "
        "propensity (pinned requests, never randomised) excluded. "
        f"1/p clipped at {num(off['max_weight'], 'g')}"
        + (f" (clipped rows: {', '.join(f'{k} {v}' for k, v in clipped.items())})." if clipped else
           " (no row clipped).")
        + " An effective sample size far below the matching rows means a few heavily weighted rows carry "
        "the estimate.", "",
        md_table(off_policy_rows(off), OFF_POLICY_COLUMNS), "",
        "The classical tables below count the observed cells only: a router's accuracy over the test queries "
        "where it chose the target that answered (unweighted replay: biased toward the logging router's "
        "choices), a single model's over the queries sent to it, and the oracle is the logging policy's own "
        "mean, so gap closed and the frontier metrics estimate nothing on logged traffic; the pairwise AUC needs "
        "two labelled targets on one query (only a repeated prompt sent to both has them). Skipped: "
        + "; ".join(f"`{k}` ({v})" for k, v in off.get("skipped_metrics", {}).items()) + ".", "",
    ]
