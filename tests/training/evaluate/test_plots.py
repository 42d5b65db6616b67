"""The cost-accuracy plot: operating points drawn on top with a legend entry, and target labels
that do not overlap (training.evaluate.plots)."""

from __future__ import annotations

import itertools
import json

import pytest

from tests.training.evaluate.test_results import COMMITTED


def _text_boxes(ax, texts):
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    for t in texts:
        t.update_positions(renderer)
    return [Text.get_window_extent(t, renderer) for t in texts]


def test_crowded_labels_do_not_overlap_and_stay_inside():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.evaluate.plots import place_labels

    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(1.0 + 0.01 * i, 0.5 + 0.002 * i) for i in range(6)] + [(1.0, 0.5), (2.0, 0.9)]  # six nearly on one spot
    ax.plot(*zip(*points), "k^")
    ax.set_xlim(0, 3)
    ax.set_ylim(0, 1)
    names = [f"target-number-{i}" for i in range(len(points))]
    texts = place_labels(ax, points, names)
    assert [t.get_text() for t in texts] == names
    boxes = _text_boxes(ax, texts)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    assert all(frame.contains(b.x0, b.y0) and frame.contains(b.x1, b.y1) for b in boxes)
    plt.close(fig)


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(next(p for p in COMMITTED if "routerbench/" in str(p)).read_text())


def test_operating_points_are_on_top_with_a_legend_entry_and_labels_apart(report):
    import matplotlib.pyplot as plt

    from training.evaluate.plots import figure

    fig = figure(report, "test")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    points = [line for label, line in lines.items() if label.startswith("prefill-router operating point (")]
    assert len(points) == 1, sorted(lines)
    point, sweep = points[0], lines["prefill-router (tolerance sweep)"]
    assert point.get_zorder() > max(line.get_zorder() for line in ax.get_lines() if line is not point
                                    and "operating point" not in line.get_label())
    assert point.get_marker() == "D" and point.get_marker() != sweep.get_marker()
    assert point.get_label() in [t.get_text() for t in ax.get_legend().get_texts()]
    labels = [t for t in ax.texts if t.get_text() in report["targets"]]
    assert len(labels) == len(report["targets"])
    boxes = _text_boxes(ax, labels)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    plt.close(fig)
