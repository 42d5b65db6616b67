"""Cost-accuracy plots of ``prefill-router evaluate`` (one PNG per subset of the report)."""

from __future__ import annotations

import io
from typing import Any

from shared.policy import policy_names

FILES = {"test": "cost_accuracy.png", "disagreement": "cost_accuracy_disagreement.png"}


def plot(report: dict[str, Any], subset: str = "test") -> bytes:
    """PNG of one subset: every router (probabilistic: its tolerance sweep as a line, its
    operating point as a dot; the prefill router's front under each other policy (value) dashed; fixed: a
    square), every single model as a triangle, the oracle
    (star) and the zero-router hull (dashed: the upper convex hull of the single models, what
    mixing them at random reaches). Dotted guides: the best single model's accuracy (the
    iso-accuracy line) and the cost at ``savings_threshold`` savings vs the most expensive; on test,
    a published pooled accuracy (``published``) as a solid line. When every target costs the same
    (``references.equal_costs``), the accuracy markers of :mod:`training.evaluate.plot_accuracy` instead."""
    from training.evaluate.plot_accuracy import PUBLISHED_COLORS, accuracy_plot

    if report["subsets"][subset]["references"].get("equal_costs"):
        return accuracy_plot(report, subset)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = report["subsets"][subset]
    refs = sub["references"]
    fig, ax = plt.subplots(figsize=(11, 5.8))
    for name, r in sub["routers"].items():
        if r["kind"] == "probabilistic":
            (line,) = ax.plot(r["sweep"]["cost"], r["sweep"]["accuracy"], "-", marker=".", ms=2.5, lw=1.2,
                              alpha=0.85, label=f"{name} (sweep)")
            ax.plot([r["cost"]], [r["accuracy"]], "o", color=line.get_color(), ms=6)
            for policy in policy_names()[1:] if name == "prefill-router" else ():
                if r.get(f"{policy}_policy"):
                    front = r[f"{policy}_policy"]["frontier"]
                    ax.step(front["cost"], front["accuracy"], where="post", color=line.get_color(), ls="--", lw=1.4,
                            label=f"{name}, {policy} policy (Pareto front)")
        else:
            ax.plot([r["cost"]], [r["accuracy"]], "s", ms=7, label=name)
    for name, s in refs["single"].items():
        ax.plot([s["cost"]], [s["accuracy"]], "k^", ms=7)
        ax.annotate(name, (s["cost"], s["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.plot(refs["hull"]["cost"], refs["hull"]["accuracy"], "k--", lw=1, label="zero router (single-model hull)")
    ax.plot([refs["oracle"]["cost"]], [refs["oracle"]["accuracy"]], "k*", ms=12, label="oracle")
    best, dear = refs["best_single"], refs["most_expensive"]["cost"]
    ax.axhline(best["accuracy"], color="grey", ls=":", lw=0.9, label=f"best single accuracy ({best['target']})")
    for i, p in enumerate((report.get("published") or []) if subset == "test" else []):
        if p.get("accuracy") is not None:
            ax.axhline(p["accuracy"], color=PUBLISHED_COLORS[i % len(PUBLISHED_COLORS)], ls="-", lw=1.3,
                       label=f"published: {p['label']}")
    thr = report.get("savings_threshold")
    if thr is not None and dear:
        ax.axvline((1 - thr) * dear, color="grey", ls="-.", lw=0.9,
                   label=f"{100 * thr:.2f}% cheaper than the most expensive")
    ax.set_xscale("log" if dear > 20 * max(refs["cheapest"]["cost"], 1e-12) else "linear")
    ax.set_xlabel("mean cost per query (USD)")
    ax.set_ylabel("accuracy")
    what = "test" if subset == "test" else f"test, {subset} queries"
    ax.set_title(f"cost vs accuracy ({what}, n={refs['n']}); dots: operating points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
