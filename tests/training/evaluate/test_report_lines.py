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


def _front(pauccc: float, iso: float) -> dict:
    return {"pauccc": pauccc, "max_gap_closed": 0.0, "iso_accuracy_savings": iso, "best_gap_closed_at_savings": None}


POINT = {"param": 0.0133, "status": "calibrated", "accuracy": 0.8764, "cost": 0.0051, "gap_closed": -0.025,
         "cost_savings": 0.0177}
OURS = {"kind": "probabilistic", "policy": "value", "param": 0.0955, "accuracy": 0.8753, "cost": 0.0038,
        "gap_closed": -0.03, "cost_savings": 0.2642, "mean_auc": 0.6713, **_front(0.2553, 0.0717),
        "value_policy": _front(0.2506, -13.3886), "candidate_points": {"tolerance": POINT}}


def _refs(best: str = "gpt-3.5", tied: bool = True) -> dict:
    single = {"gpt-4": {"accuracy": 0.6875, "cost": 0.005}, "gpt-3.5": {"accuracy": 0.6875 if tied else 0.6, "cost": 4e-4}}
    return {"n": 953, "n_all_labelled": 945, "single": single,
            "best_single": {"target": best, **single[best]}, "most_expensive": {"target": "gpt-4", **single["gpt-4"]},
            "oracle": {"accuracy": 0.97, "cost": 2e-4, "cost_savings": 0.96}, "zero_router_pauccc": 0.2}


def test_each_policy_has_its_own_row_with_its_own_sweep():
    from shared.policy import Policy
    from training.evaluate.report import table_rows

    rows = table_rows({"references": _refs(), "routers": {"prefill-router": OURS}})
    value, tol = rows[0], rows[1]  # the operating point's policy first, then the other
    assert value[0] == f"prefill-router ({Policy.of('value', 0.0955).label()}) ◀ artifact's operating point"
    assert value[1:3] == ["87.53%", "0.0038"] and value[5] == "0.2506" and value[7] == "-1338.86%"  # the value sweep's
    assert tol[0] == f"prefill-router ({Policy.of('tolerance', 0.0133).label()}; calibrated on val, not kept)"
    assert tol[1:5] == ["87.64%", "0.0051", "-2.50%", "1.77%"] and tol[5] == "0.2553" and tol[7] == "7.17%"
    older = {k: v for k, v in OURS.items() if k != "candidate_points"}  # an older report: the candidate, no point
    rows = table_rows({"references": _refs(), "routers": {"prefill-router": {
        **older, "operating_point": {"candidates": [{**POINT, "policy": "tolerance"}]}}}})
    assert rows[1][0].endswith("not kept; test point not in this report)") and rows[1][1:5] == ["—"] * 4
    assert rows[1][5] == "0.2553"
    rows = table_rows({"references": _refs(), "routers": {"knn": older}})  # not calibrated (no val rows)
    assert rows[0][0].endswith("◀ operating point") and rows[1][0] == "knn (tolerance policy: sweep only, not calibrated)"


def test_savings_name_their_reference_and_ties_are_said():
    from training.evaluate.report import task_rows
    from training.evaluate.report_cells import columns, tie_note, ties

    refs = _refs()
    assert ties(refs) == ["gpt-4"] and ties(_refs("gpt-4", tied=False)) == [] == tie_note(_refs("gpt-4", False)).split()
    assert "savings at best-single accuracy (gpt-3.5)" in columns(refs)
    report = {"by_task": {"mbpp": {"test": {"references": refs, "routers": {"prefill-router": OURS}}}}}
    row = task_rows(report)[0]
    assert row[2] == "gpt-3.5 68.75% (tied with gpt-4 at 68.75%; kept as the cheaper)"
    same = _refs()
    same["single"]["gpt-4"]["cost"] = same["best_single"]["cost"]  # equal prices: the order decides
    assert tie_note(same).endswith("kept as the first of the cheapest in the targets' order)")
    assert row[7] == "-1338.86% (vs gpt-3.5)"  # the operating point's (value) sweep, against the tied cheaper model


def test_the_intro_states_the_tie_break_and_the_rows_the_oracle_counts():
    import copy
    import json

    from training.evaluate.report import intro_lines, oracle_rows
    from training.metrics import BEST_SINGLE_TIE_BREAK
    from tests.training.evaluate.test_results import COMMITTED

    report = json.loads(next(p for p in COMMITTED if "routerbench/" in str(p)).read_text())
    refs = report["subsets"]["test"]["references"]
    text = "\n".join(intro_lines(report))
    assert BEST_SINGLE_TIE_BREAK in text and "Test: gpt-4-1106-preview (no tie)." in text
    tied = copy.deepcopy(report)
    r = tied["subsets"]["test"]["references"]
    r["single"]["gpt-3.5-turbo-1106"]["accuracy"] = r["best_single"]["accuracy"]
    r["best_single"] = {"target": "gpt-3.5-turbo-1106", **r["single"]["gpt-3.5-turbo-1106"]}
    text = "\n".join(intro_lines(tied))
    assert "Test: gpt-3.5-turbo-1106 (tied with gpt-4-1106-preview at 87.86%; kept as the cheaper)." in text
    assert "never counted wrong" in oracle_rows(refs) and "449 of the 454 rows are labelled by every target" in (
        oracle_rows(refs))
    older = {k: v for k, v in refs.items() if k != "n_all_labelled"}  # a report from before the count was kept
    assert "never counted wrong" in oracle_rows(older) and "`data import`" not in oracle_rows(older)
    assert "945 of the 953 rows are labelled by every target" in oracle_rows(_refs())
