"""Logged traffic for the pipeline tests: what `data_import` reads in its long format."""

from __future__ import annotations

from pathlib import Path


def logged_traffic(path: Path) -> Path:
    """40 short prompts x pipeline-small's two targets, long format (one row per prompt x model)."""
    import pandas as pd

    rows = []
    for i in range(40):
        a, b = i % 7 + 1, i // 7 + 2
        task, question = ("sums", f"What is {a} + {b}?") if i % 2 else ("products", f"What is {a} * {b}?")
        rows += [{"prompt": f"{question} Answer with the number only.", "model": "smollm2-135m", "task": task,
                  "correct": int(task == "sums" and a + b < 8), "cost": 1e-6},
                 {"prompt": f"{question} Answer with the number only.", "model": "gemma3-270m", "task": task,
                  "correct": int(a * b % 3 == 0 or a < 3), "cost": 2e-6}]
    pd.DataFrame(rows).to_parquet(path)
    return path
