"""How good must the router's P(correct) be? Calibrated synthetic routers on real labels and costs.

The RouterBench goals (savings at GPT-4's accuracy >= 50%, gap closed >= 45.58% at >= 74.31%
savings) depend on how well P(correct) ranks each target's queries *inside* a task: the task
itself is worth nothing here (``task-best`` is GPT-4 on every task). This benchmark replaces
the router's predictions by synthetic ones of a known quality on the same test split, the
same labels, the same price model and the same metrics as ``prefill-router evaluate``
(:func:`training.evaluate.scoring.score_probabilistic`), and reports what each quality buys.

Synthetic predictions (:func:`synthetic_proba`): per query ``i`` and target ``j`` a score
``s_ij = y_ij + sigma * (sqrt(rho) z_i + sqrt(1 - rho) e_ij)`` with ``z, e ~ N(0, 1)``; ``rho``
is the share of the noise common to all targets of a query (a router that mostly sees
"this query is hard"). ``P_ij = P(y_ij = 1 | s_ij)``, the exact posterior with the target's
train base rate ``pi_j``: calibrated by construction. Smaller ``sigma``: higher AUC.

    .venv/bin/python bench/routing_headroom.py --work-dir runs/pipeline-routerbench \\
        --artifact data/routerbench/router --reports data/routerbench/eval/report.json \\
        data/routerbench-qwen/eval/report.json

needs the work_dir of ``prefill-router pipeline run -c configs/pipeline-routerbench.yaml``
(its labels and activations: the split and the encoder's token counts). Writes
``routing_headroom.json`` and ``routing_headroom.png`` (savings at GPT-4's accuracy against
within-task AUC, under the tolerance policy and the value policy, with the measured routers
of ``--reports`` as points).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

SIGMAS = (4.0, 3.0, 2.0, 1.5, 1.2, 1.0, 0.8, 0.6)
RHOS = (0.0, 0.5)
# The columns of bench/README.md's two tables (markdown), per policy: each a pair of rho 0 / rho 0.5 rows
POLICY_FIELDS = ("iso_accuracy_savings", "iso_reached_share", "best_gap_closed_at_savings", "pauccc")
# What the tables read of the JSON: key -> sub-keys of each row (dotted: nested).
TABLE_FIELDS = {"synthetic": ("rho", "sigma", "within_task_auc", *POLICY_FIELDS,
                              *(f"value_policy.{f}" for f in POLICY_FIELDS)),
                "measured": ("router", "within_task_auc", "iso_accuracy_savings")}


def synthetic_proba(Y: np.ndarray, base_rate: np.ndarray, sigma: float, rho: float,
                    rng: np.random.Generator) -> np.ndarray:
    """``(n, T)`` calibrated P(correct): ``P = pi phi((s - 1) / sigma) / (pi phi((s - 1) / sigma)
    + (1 - pi) phi(s / sigma))`` for ``s = y + sigma (sqrt(rho) z_i + sqrt(1 - rho) e_ij)``.
    ``Y`` ``(n, T)`` 0/1 (NaN read as 0: masked out by the metrics anyway); ``base_rate`` ``(T,)``."""
    from scipy.stats import norm

    n, T = Y.shape
    noise = np.sqrt(rho) * rng.standard_normal((n, 1)) + np.sqrt(1 - rho) * rng.standard_normal((n, T))
    s = np.nan_to_num(Y) + sigma * noise
    right = base_rate * norm.pdf((s - 1) / sigma)
    return right / (right + (1 - base_rate) * norm.pdf(s / sigma))


def load_split(work_dir: str, artifact: str, targets: list[str]):
    """Test rows' ``Y``, outcome and decision costs, tasks; the targets' train base rates."""
    from shared.artifact import load_artifact
    from training.dataset import load_routing_data
    from training.evaluate.scoring import decision_costs, outcome_costs
    from training.semantic_text import read_queries

    router = load_artifact(artifact)
    first = sorted(router.meta.pooling)[0]
    data = load_routing_data(f"{work_dir}/activations", f"{work_dir}/labels", targets, blocks=[first])
    C_route = decision_costs(router, data)
    C = outcome_costs(data, C_route)
    te, tr = data.split == "test", data.split == "train"
    tasks = np.array(read_queries(f"{work_dir}/queries.parquet", data.query_ids[te])["task"], dtype=object)
    return data.Y[te], C[te], C_route[te], tasks, np.nanmean(data.Y[tr], axis=0)


def sweep_quality(Y, C, C_route, tasks, base_rate, targets, draws: int, seed: int) -> list[dict]:
    """One row per (rho, sigma): mean over ``draws`` of the synthetic router's metrics."""
    from shared.policy import Policy
    from training.evaluate.scoring import PAPER_SAVINGS, references, score_probabilistic
    from training.metrics import within_group_auc

    cfg = SimpleNamespace(pauccc_interpolation="linear", savings_threshold=PAPER_SAVINGS)
    refs = references(Y, C, targets, cfg.savings_threshold)
    rule = Policy.of("tolerance", 0.05)  # the operating point; the sweeps are over every tolerance and value
    rng, rows = np.random.default_rng(seed), []
    for rho in RHOS:
        for sigma in SIGMAS:
            runs = []
            for _ in range(draws):
                P = synthetic_proba(Y, base_rate, sigma, rho, rng)
                r = score_probabilistic(P, Y, C_route, C, rule, refs, targets, cfg)
                v = r["value_policy"]
                runs.append([np.nanmean(within_group_auc(Y, P, tasks)), r["iso_accuracy_savings"],
                             r["best_gap_closed_at_savings"], r["pauccc"], v["iso_accuracy_savings"],
                             v["best_gap_closed_at_savings"], v["pauccc"]])
            runs = np.array(runs, dtype=float)
            reached, v_reached = (float(np.mean(np.isfinite(runs[:, k]))) for k in (1, 4))
            runs[:, [1, 4]] = np.nan_to_num(runs[:, [1, 4]])  # "not reached" counts as no saving
            with np.errstate(invalid="ignore"):  # no point at >= 74.31% savings (NaN) in some draws
                m = np.nanmean(runs, axis=0)
            rows.append({"rho": rho, "sigma": sigma, "within_task_auc": m[0], "iso_accuracy_savings": m[1],
                         "iso_reached_share": reached, "best_gap_closed_at_savings": m[2], "pauccc": m[3],
                         "value_policy": {"iso_accuracy_savings": m[4], "iso_reached_share": v_reached,
                                          "best_gap_closed_at_savings": m[5], "pauccc": m[6]}})
            print(f"rho {rho:.1f} sigma {sigma:4.1f}: within-task AUC {m[0]:.3f}; tolerance / value policy: savings "
                  f"at GPT-4's accuracy {100 * m[1]:5.1f}% / {100 * m[4]:5.1f}% (0 where not reached; reached in "
                  f"{100 * reached:.0f}% / {100 * v_reached:.0f}% of draws), best gap closed at >= 74.31% savings "
                  f"{100 * m[2]:6.1f}% / {100 * m[5]:6.1f}%, P-AUCCC {m[3]:.4f} / {m[6]:.4f}", flush=True)
    return rows


def within_task_from_rows(report: dict, name: str) -> float:
    """Mean within-task AUC of router ``name`` from a report's per-task rows (for reports written
    before ``within_task_auc`` existed): per target ``sum_g n_g AUC_g / sum_g n_g`` over the tasks
    where it is defined, then the mean over targets, as :func:`training.evaluate.uncertainty.within_group_auc`."""
    per_target = {}
    for parts in report["by_task"].values():
        n = parts["test"]["references"]["n"]
        for target, auc in parts["test"]["routers"][name]["auc"].items():
            if auc is not None:
                num, den = per_target.get(target, (0.0, 0))
                per_target[target] = (num + n * auc, den + n)
    return float(np.mean([num / den for num, den in per_target.values()]))


def measured(reports: list[str]) -> list[dict]:
    """The probabilistic routers of committed evaluation reports: within-task AUC and savings."""
    out = []
    for path in reports:
        report = json.loads(Path(path).read_text())
        encoder = Path(path).parent.parent.name
        for name, test in report["subsets"]["test"]["routers"].items():
            if test["kind"] != "probabilistic":
                continue
            inside = report.get("within_task_auc", {}).get(name, {}).get("mean_auc")
            out.append({"report": path, "router": f"{name} ({encoder})" if name == "prefill-router" else name,
                        "within_task_auc": inside if inside is not None else within_task_from_rows(report, name),
                        "iso_accuracy_savings": test["iso_accuracy_savings"],
                        **({"value_iso_accuracy_savings": test["value_policy"]["iso_accuracy_savings"]}
                           if test.get("value_policy") else {})})
    return out


def markdown(rows: list[dict], value_policy: bool = False) -> str:
    """bench/README.md's table of the tolerance policy (or the value policy): one line per sigma,
    rho 0 and rho 0.5 side by side (savings count 0 where a draw does not reach GPT-4's accuracy)."""
    by = {(r["rho"], r["sigma"]): r for r in rows}
    name = "savings at GPT-4's accuracy" + (", value policy" if value_policy else "")
    lines = [f"| within-task AUC (rho 0 / 0.5) | {name}, rho 0 (draws reaching it) | rho 0.5 | best gap closed at "
             "≥ 74.31% savings, rho 0 | rho 0.5 | P-AUCCC, rho 0 | rho 0.5 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for sigma in sorted({r["sigma"] for r in rows}, reverse=True):
        pair = [by[(rho, sigma)] for rho in RHOS]
        (s0, r0, g0, p0), (s1, r1, g1, p1) = ([(r["value_policy"] if value_policy else r)[f] for f in POLICY_FIELDS]
                                              for r in pair)
        gap0, gap1 = (f"{100 * g:+.1f}%".replace("-", "−") for g in (g0, g1))
        lines.append(f"| {pair[0]['within_task_auc']:.3f} / {pair[1]['within_task_auc']:.3f} | {100 * s0:.1f}% "
                     f"({100 * r0:.0f}%) | {100 * s1:.1f}% ({100 * r1:.0f}%) | {gap0} | {gap1} | {p0:.4f} | {p1:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for rho in RHOS:
        sel = [r for r in rows if r["rho"] == rho]
        (line,) = ax.plot([r["within_task_auc"] for r in sel],
                          [100 * np.nan_to_num(r["iso_accuracy_savings"]) for r in sel], "o-",
                          label=f"calibrated synthetic router, shared noise share {rho}, tolerance policy")
        ax.plot([r["within_task_auc"] for r in sel],
                [100 * np.nan_to_num(r["value_policy"]["iso_accuracy_savings"]) for r in sel], "s--",
                color=line.get_color(), label="same, value policy")
    seen = set()
    for p in points:
        if p["router"] in seen:
            continue
        seen.add(p["router"])
        for key, mark in (("iso_accuracy_savings", "^"), ("value_iso_accuracy_savings", "s")):
            if key not in p:
                continue
            y = 100 * (p[key] or 0.0)
            ax.plot(p["within_task_auc"], y, mark, color="k" if "prefill" in p["router"] else "grey")
            ax.annotate(p["router"] + (" (value)" if mark == "s" else ""), (p["within_task_auc"], y), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.axhline(50, color="grey", ls="--", lw=1)
    ax.set_xlabel("mean within-task AUC on the RouterBench test split")
    ax.set_ylabel("savings at GPT-4's accuracy (%; 0 = not reached)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default="runs/pipeline-routerbench")
    ap.add_argument("--artifact", default="data/routerbench/router")
    ap.add_argument("--reports", nargs="*", default=[])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    from shared.artifact import load_artifact

    targets = load_artifact(args.artifact).target_names
    Y, C, C_route, tasks, base_rate = load_split(args.work_dir, args.artifact, targets)
    rows = sweep_quality(Y, C, C_route, tasks, base_rate, targets, args.draws, args.seed)
    points = measured(args.reports)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing_headroom.json").write_text(json.dumps({"args": vars(args), "n_test": int(len(Y)),
                                                           "synthetic": rows, "measured": points}, indent=2) + "\n")
    plot(rows, points, out / "routing_headroom.png")
    print(markdown(rows), markdown(rows, value_policy=True), sep="\n\n")
    print(f"written to {out}/routing_headroom.json and routing_headroom.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
