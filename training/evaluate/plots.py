"""Cost-accuracy plots of ``prefill-router evaluate`` (one PNG per subset of the report)."""

from __future__ import annotations

import io
from typing import Any

from shared.policy import Policy, policy_names

FILES = {"test": "cost_accuracy.png", "disagreement": "cost_accuracy_disagreement.png"}
# Where a target's label may go, in points from its marker: right, left, above, below, then further out.
LABEL_OFFSETS = [(6, 0), (-6, 0), *((dx, dy) for r in (1, 2, 3, 4) for dx in (6, -6) for dy in (9 * r, -9 * r))]


def place_labels(ax, points: list[tuple[float, float]], names: list[str], avoid: list[tuple[float, float]] = (),
                 fontsize: float = 7) -> list:
    """Annotate each ``(x, y)`` data point with its name where the text overlaps no label placed
    before it, no other point's marker nor one at ``avoid`` (other markers: operating points, the
    oracle) and stays inside the axes: the first free offset of :data:`LABEL_OFFSETS` (a thin
    leader line when it is not beside the marker); when none is free, the one overlapping the
    fewest (outside the axes counts as many). Call it once the axes' limits and layout are final
    (the test is in display space). Returns the text artists, in the order of ``names``."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    pix = [ax.transData.transform(p) for p in points]
    half = 4 * fig.dpi / 72  # a marker's half width in pixels
    markers = [Bbox.from_extents(x - half, y - half, x + half, y + half)
               for x, y in [*pix, *(ax.transData.transform(p) for p in avoid)]]
    frame = ax.get_window_extent(renderer)
    placed, texts = [], {}
    for i in sorted(range(len(points)), key=lambda k: -pix[k][1]):  # top down
        best = None
        for rank, (dx, dy) in enumerate(LABEL_OFFSETS):
            text = ax.annotate(names[i], points[i], xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                               ha="left" if dx > 0 else "right", va="center", zorder=7,
                               arrowprops=None if rank < 2 else {"arrowstyle": "-", "lw": 0.6, "color": "0.35"})
            text.update_positions(renderer)
            box = Text.get_window_extent(text, renderer)  # the text alone, not its leader line
            outside = not (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1))
            clashes = (sum(box.overlaps(b) for b in placed) + 100 * outside
                       + sum(box.overlaps(m) for j, m in enumerate(markers) if j != i))
            if best is None or clashes < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clashes, text, box)
            else:
                text.remove()
            if clashes == 0:
                break
        placed.append(best[2])
        texts[i] = best[1]
    return [texts[i] for i in range(len(points))]


def _routers(ax, sub: dict[str, Any]) -> list[tuple[float, float]]:
    """Each router: a probabilistic one's tolerance sweep (line), the prefill router's front under
    each other policy (dashed) and its operating point on top (diamond, legend entry); a fixed
    router's one point (square, under the single models' triangles it may coincide with).
    Returns the points drawn as markers."""
    points = [(r["cost"], r["accuracy"]) for r in sub["routers"].values()]
    for name, r in sub["routers"].items():
        if r["kind"] != "probabilistic":
            ax.plot([r["cost"]], [r["accuracy"]], "s", ms=8, zorder=3, label=name)
            continue
        (line,) = ax.plot(r["sweep"]["cost"], r["sweep"]["accuracy"], "-", marker=".", ms=2.5, lw=1.2, alpha=0.85,
                          zorder=2, label=f"{name} ({policy_names()[0]} sweep)")
        for policy in policy_names()[1:] if name == "prefill-router" else ():
            if r.get(f"{policy}_policy"):
                front = r[f"{policy}_policy"]["frontier"]
                ax.step(front["cost"], front["accuracy"], where="post", color=line.get_color(), ls="--", lw=1.4,
                        zorder=2, label=f"{name}, {policy} policy (Pareto front)")
        ax.plot([r["cost"]], [r["accuracy"]], ls="none", marker="D", ms=9 if name == "prefill-router" else 7,
                mfc=line.get_color(), mec="black", mew=1.3, zorder=6,
                label=f"{name} operating point ({Policy.of(r['policy'], r['param']).label()})")
    return points


def plot(report: dict[str, Any], subset: str = "test") -> bytes:
    """PNG of one subset (:func:`figure`). When every target costs the same
    (``references.equal_costs``), the accuracy markers of :mod:`training.evaluate.plot_accuracy` instead."""
    import matplotlib.pyplot as plt

    from training.evaluate.plot_accuracy import accuracy_plot

    if report["subsets"][subset]["references"].get("equal_costs"):
        return accuracy_plot(report, subset)
    fig = figure(report, subset)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def figure(report: dict[str, Any], subset: str = "test"):
    """The figure of one subset: every router (:func:`_routers`), every single model as a triangle
    labelled without overlaps (:func:`place_labels`), the oracle (star) and the zero-router hull
    (dashed: the upper convex hull of the single models, what mixing them at random reaches).
    Dotted guides: the best single model's accuracy (the iso-accuracy line) and the cost at
    ``savings_threshold`` savings vs the most expensive; on test, a published pooled accuracy
    (``published``) as a solid line."""
    import matplotlib

    from training.evaluate.plot_accuracy import PUBLISHED_COLORS

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = report["subsets"][subset]
    refs = sub["references"]
    fig, ax = plt.subplots(figsize=(11, 5.8))
    avoid = _routers(ax, sub) + [(refs["oracle"]["cost"], refs["oracle"]["accuracy"])]
    singles = list(refs["single"].items())
    ax.plot([s["cost"] for _, s in singles], [s["accuracy"] for _, s in singles], "k^", ms=7, ls="none", zorder=4,
            label="single models (labelled)")
    ax.plot(refs["hull"]["cost"], refs["hull"]["accuracy"], "k--", lw=1, label="zero router (single-model hull)")
    ax.plot([refs["oracle"]["cost"]], [refs["oracle"]["accuracy"]], "k*", ms=12, zorder=5, label="oracle")
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
    ax.set_title(f"cost vs accuracy ({what}, n={refs['n']}); diamonds: operating points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    place_labels(ax, [(s["cost"], s["accuracy"]) for _, s in singles], [name for name, _ in singles], avoid)
    return fig
