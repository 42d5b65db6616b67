"""bench/next_token_signal.py: within-task AUC of the encoder's next-token confidence (pure parts)."""

import numpy as np

from bench.next_token_signal import markdown, signal_table


def test_signal_table_ranks_inside_each_task_and_negates_entropy():
    rng = np.random.default_rng(0)
    n = 200
    tasks = np.array(["arc"] * 100 + ["wino"] * 100)
    sure = rng.random(n)
    right = (sure > 0.5).astype(float)
    Y = np.stack([right, rng.integers(0, 2, n).astype(float)], 1)
    Y[0, 1] = np.nan  # a missing label is left out
    stats = np.stack([sure, sure / 2, 1 - sure], 1)  # entropy falls as the encoder gets surer
    table = signal_table(stats, Y, tasks, ["a", "b"])
    assert table["arc"]["n"] == 100 and set(table) == {"arc", "wino"}
    for name in ("top1", "margin", "-entropy"):
        assert table["wino"][name]["a"] == 1.0  # target a is right exactly where the encoder is sure
        assert 0.3 < table["arc"][name]["b"] < 0.7  # target b: a coin
    flat = signal_table(np.ones((n, 3)), Y, tasks, ["a", "b"])
    assert flat["arc"]["top1"]["a"] == 0.5  # no signal: ties
    text = markdown(table, ["a", "b"], "a")
    assert "| wino | 100 | -entropy |" in text and text.count("\n") == 1 + 2 * 3


def test_sample_is_seeded_per_task_and_refuses_too_many(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from bench.next_token_signal import write_sample

    table = pa.table({"query_id": [f"q{i}" for i in range(30)], "task": ["a"] * 20 + ["b"] * 10})
    pq.write_table(table, tmp_path / "q.parquet")
    assert write_sample(str(tmp_path / "q.parquet"), {"a": 5, "b": 3}, 0, str(tmp_path / "s.parquet")) == 8
    first = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert [r["task"] for r in first].count("a") == 5 and len(first) == 8
    write_sample(str(tmp_path / "q.parquet"), {"a": 5, "b": 3}, 0, str(tmp_path / "t.parquet"))
    assert pq.read_table(tmp_path / "t.parquet").to_pylist() == first  # same seed, same rows
    with pytest.raises(SystemExit, match="10 rows of task 'b'"):
        write_sample(str(tmp_path / "q.parquet"), {"b": 11}, 0, str(tmp_path / "u.parquet"))
