"""Markdown sections of the evaluation report, from hand-made report dicts."""


def test_within_task_table_leaves_out_task_columns_when_there_are_many():
    from training.evaluate.report import MAX_TASK_COLUMNS, within_task_lines

    def report(n_tasks: int) -> dict:
        rows = {"prefill-router": {"mean_auc": 0.61}, "knn-minilm": {"mean_auc": 0.52}}
        by_task = {f"task{i}": {"test": {"routers": {k: {"mean_auc": 0.6} for k in rows}}} for i in range(n_tasks)}
        return {"within_task_auc": rows, "by_task": by_task, "auc_margin_within_task": {}}

    few = "\n".join(within_task_lines(report(3)))
    assert "| router | mean within-task AUC | task0 | task1 | task2 |" in few and "| prefill-router | 0.610 |" in few
    many = "\n".join(within_task_lines(report(MAX_TASK_COLUMNS + 1)))
    assert "| router | mean within-task AUC |\n" in many and "task0" not in many and "9 tasks" in many
    assert within_task_lines({"by_task": {}}) == []


def test_operating_point_interval_line():
    from training.evaluate.report import interval_lines

    refs = {"best_single": {"target": "gpt-4"}, "most_expensive": {"target": "gpt-4"}}
    report = {"subsets": {"test": {"references": refs}},
              "operating_point_interval": {"accuracy": [0.8764, 0.846, 0.905], "accuracy_minus_best": [-0.0022, -0.02, 0.015],
                                           "cost_savings": [0.264, 0.21, 0.31]}}
    line = interval_lines(report)[0]
    assert "accuracy 87.64% [84.60%, 90.50%]" in line and "minus gpt-4's -0.22 points [-2.00, +1.50]" in line
    assert "cost savings vs gpt-4 26.40% [21.00%, 31.00%]" in line
    assert interval_lines({"operating_point_interval": None}) == []
