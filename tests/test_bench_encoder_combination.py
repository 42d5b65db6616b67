"""bench/encoder_combination.py: joining captures and scoring out-of-fold predictions (pure parts)."""

import numpy as np
import pytest

from bench.encoder_combination import align, combinations, fold_scores, markdown, parse_capture


def test_parse_capture_splits_name_uri_and_blocks_and_names_a_bad_spec():
    assert parse_capture("qwen=s3://b/acts:h18_last,h21_last") == ("qwen", "s3://b/acts", ["h18_last", "h21_last"])
    with pytest.raises(ValueError, match="name=activations_uri:block"):
        parse_capture("runs/acts:h18_last")


def test_align_keeps_the_queries_every_capture_holds_in_the_first_order():
    a, b = np.array(["q3", "q1", "q2", "q9"]), np.array(["q1", "q2", "q3", "q7"])
    ia, ib = align([a, b])
    assert list(a[ia]) == ["q3", "q1", "q2"] and list(b[ib]) == ["q3", "q1", "q2"]


def test_combinations_lists_every_subset_singles_first():
    assert combinations(["s", "q", "m"]) == [("s",), ("q",), ("m",), ("s", "q"), ("s", "m"), ("q", "m"),
                                             ("s", "q", "m")]


def test_fold_scores_tell_pooled_from_within_task_ranking():
    rng = np.random.default_rng(0)
    tasks = np.array(["easy"] * 100 + ["hard"] * 100)
    y_task = np.r_[np.ones(100), np.zeros(100)]
    y_task[rng.choice(100, 20, replace=False)] = 0       # some misses inside "easy"
    y_task[100 + rng.choice(100, 20, replace=False)] = 1  # some hits inside "hard"
    Y = np.stack([y_task, y_task], 1)
    knows_task = np.stack([np.r_[np.full(100, 0.8), np.full(100, 0.2)]] * 2, 1)  # target 0 and 1 alike
    knows_query = np.stack([y_task * 0.6 + 0.2] * 2, 1)
    halves = [np.arange(0, 200, 2), np.arange(1, 200, 2)]
    task_only = fold_scores(Y, tasks, [(h, knows_task[h]) for h in halves])
    assert task_only["pooled"][0] > 0.75 and task_only["within"][0] == pytest.approx(0.5)
    perfect = fold_scores(Y, tasks, [(h, knows_query[h]) for h in halves])
    assert perfect["within"][0] == pytest.approx(1.0) and perfect["pooled"][1] == pytest.approx(1.0)
    row = {"sources": ["s", "q"], "blocks": ["s:h1", "q:h2"], "n_components": 8, "mean_pooled_auc": 0.7,
           "mean_within_task_auc": 0.6, "first_target_within_task_auc": 0.55}
    assert "| s + q | s:h1, q:h2 | 8 | 0.700 | 0.600 | 0.550 |" in markdown([row], "gpt-4")
