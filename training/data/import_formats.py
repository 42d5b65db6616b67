"""The input formats of ``prefill-router data import``: one :class:`ImportFormat` subclass each.

A subclass registers itself under its ``name`` (the import config's ``format``), so adding a
format is one class in this file: its ``name``, file ``extensions``, the query table's
``source`` of its queries, and :meth:`ImportFormat.read`, which turns a file's rows into
queries and label cells through the importer's ``Collector`` (``col.target`` maps a source
model to its registry name, ``col.query`` finds or creates the query of a prompt,
``col.observe`` records a (query, target) cell, ``col.skip`` counts an unreadable row). A file
that is not a CSV, pickled DataFrame, Parquet or JSONL table also overrides
:meth:`ImportFormat.records`; an input that is not a set of files overrides
:meth:`ImportFormat.collect`, which reads every input into the Collector.

- :class:`RouterBench`: RouterBench's column scheme (one row per prompt; ``<model>``,
  ``<model>|total_cost``, ...) from a CSV or a trusted pickle.
- :class:`Long`: one row per prompt x model (Parquet, CSV, JSONL or a trusted pickle).
- :class:`RouterDC`: RouterDC's JSON lists (``question``, ``scores`` {model: soft score}); the
  task is the file's name (or the config's ``tasks`` map); ``cluster_id`` is ignored.
- :class:`~training.data.import_log.DecisionLog` (``format=decision-log``, in
  :mod:`training.data.import_log`): the Serve app's decision log (``shared.decision_log``, local
  or ``s3://``) with its feedback: each answered chat request whose prompt was kept is a query;
  a decision with feedback is one (query, target) cell labelled by the mean of its ``user``
  scores, else of its judges' (``label_sources``), costed at its ``expected_cost``, with its
  ``propensity`` kept; a decision without feedback is masked. ``since``/``until`` pick a window.
"""

from __future__ import annotations

import json
import re
import tempfile
from importlib import import_module
from pathlib import Path
from typing import Any, ClassVar

from shared.errors import BadInput, UnknownName
from training.data.source_models import ROUTERBENCH_MODELS, ROUTERDC_MODELS
from training.queries import BadRecord

from training.data.import_sources import (blank, messages_of, number, read_records, require, sha256_file,
                                          staged_inputs, text_of)

FORMATS: dict[str, type[ImportFormat]] = {}  # name -> format, in definition order


class ImportFormat:
    """One input format; a subclass is registered under its ``name``."""

    name: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]  # lower-case file suffixes; a folder input reads its files with these
    source: ClassVar[str]  # the query table's ``source`` of the queries it imports
    model_names: ClassVar[dict[str, str]] = {}  # the config's default model_names (source -> registry name)
    keeps_propensity: ClassVar[bool] = False  # label folders get <target>/propensity.parquet (importer.py)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name in FORMATS:
            raise TypeError(f"two import formats are named {cls.name!r}: {FORMATS[cls.name].__name__}, {cls.__name__}")
        FORMATS[cls.name] = cls

    @classmethod
    def records(cls, path: Path, cfg: Any) -> tuple[list[str], list[dict[str, Any]]]:
        """Column names and row dicts of one input file (``cfg``: the ImportConfig)."""
        return read_records(path, cfg.trust_pickle, cfg.limit)

    @classmethod
    def read(cls, path: Path, columns: list[str], rows: list[dict[str, Any]], col: Any) -> None:
        """Add one file's rows to the importer's Collector ``col`` (``col.cfg``: the ImportConfig)."""
        raise NotImplementedError

    @classmethod
    def collect(cls, col: Any) -> list[dict[str, Any]]:
        """Read every input of ``col.cfg`` into ``col``; returns each source's ``path``, ``sha256`` and ``rows_read``
        (the import manifest's files). Here: every input file, ``s3://`` ones from a local copy."""
        cfg, sources = col.cfg, []
        with tempfile.TemporaryDirectory(prefix="pr-import-") as tmp:
            for name, path in staged_inputs(cfg.inputs, cls.name, cls.extensions, Path(tmp)):
                columns, rows = cls.records(path, cfg)
                cls.read(path, columns, rows, col)
                sources.append({"path": name, "sha256": sha256_file(path), "rows_read": len(rows)})
        return sources


def get_format(name: str) -> type[ImportFormat]:
    """The format registered as ``name``."""
    if name not in FORMATS:
        raise UnknownName(f"unknown import format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


class RouterBench(ImportFormat):
    """RouterBench rows: ``prompt``, ``eval_name``, per model ``<model>`` in {0, 1} and
    ``<model>|total_cost``; optional ``sample_id`` and ``<model>|model_response``."""

    name = "routerbench"
    extensions = (".csv", ".pkl", ".pickle")
    source = "routerbench"
    model_names = ROUTERBENCH_MODELS

    @classmethod
    def read(cls, path: Path, columns: list[str], rows: list[dict[str, Any]], col: Any) -> None:
        models = col.cfg.targets if col.cfg.targets is not None else list(col.cfg.names)
        require(path, columns, ["prompt", "eval_name"] + [c for m in models for c in (m, f"{m}|total_cost")])
        names = {m: col.target(m) for m in models}
        for i, rec in enumerate(rows):
            try:
                messages = [{"role": "user", "content": text_of(rec["prompt"], "prompt")}]
                if blank(rec["eval_name"]):
                    raise BadRecord("empty eval_name")
            except BadRecord as exc:
                col.skip(path, str(exc), f"row {i}: {rec.get('prompt')!r}")
                continue
            before = len(col.queries)
            q = col.query(messages, str(rec["eval_name"]).strip(), None if blank(rec.get("sample_id"))
                          else str(rec["sample_id"]))
            col.merged["duplicate prompts merged"] += len(col.queries) == before
            for model in models:
                response = rec.get(f"{model}|model_response")
                try:
                    answer = None if blank(response) else text_of(response, "response")
                except BadRecord:
                    answer = str(response)
                col.observe(q, names[model], rec[model], rec[f"{model}|total_cost"], answer)


class Long(ImportFormat):
    """Long rows: ``prompt`` or ``messages``, ``model``, ``correct``, ``cost`` and/or ``input_tokens`` +
    ``output_tokens`` (no cost: registry prices); optional ``task`` and ``response``."""

    name = "long"
    extensions = (".parquet", ".csv", ".jsonl", ".pkl", ".pickle")
    source = "import"
    model_names = ROUTERBENCH_MODELS  # RouterBench's own names map to the registry's

    @classmethod
    def read(cls, path: Path, columns: list[str], rows: list[dict[str, Any]], col: Any) -> None:
        require(path, columns, (["prompt"] if "messages" not in columns else []) + ["model", "correct"])
        tokens = "input_tokens" in columns and "output_tokens" in columns
        if not tokens and "cost" not in columns:
            require(path, columns, ["cost", "input_tokens", "output_tokens"])
        for i, rec in enumerate(rows):
            try:
                model = "" if blank(rec["model"]) else str(rec["model"]).strip()
                if not model:
                    raise BadRecord("empty model")
                if col.cfg.targets is not None and model not in col.cfg.targets:
                    continue
                messages = (messages_of(rec["messages"]) if not blank(rec.get("messages"))
                            else [{"role": "user", "content": text_of(rec.get("prompt"), "prompt")}])
                counts = [number(rec[c], c) for c in ("input_tokens", "output_tokens")] if tokens else [None]
            except BadRecord as exc:
                col.skip(path, str(exc), f"row {i}: {rec.get('prompt') or rec.get('messages')!r}")
                continue
            task = col.cfg.default_task if blank(rec.get("task")) else str(rec["task"]).strip()
            answer = rec.get("response") if isinstance(rec.get("response"), str) else None
            col.observe(col.query(messages, task, None), col.target(model), rec["correct"], rec.get("cost"), answer,
                        None if None in counts else tuple(counts))


class RouterDC(ImportFormat):
    """RouterDC rows: a JSON list of ``{"question": str, "scores": {model: score in [0, 1]}}``,
    one file per task (``mmlu_train.json`` -> ``mmlu``). Scores are soft (the probability of the
    right answer, or the share of 10 samples that passed) and are kept as floats; a model absent
    from a row's ``scores`` is a missing cell of that row, a score outside [0, 1] a bad cell."""

    name = "routerdc"
    extensions = (".json",)
    source = "routerdc"
    model_names = ROUTERDC_MODELS
    SPLIT_SUFFIX = re.compile(r"[-_.](train|test|val|valid|dev)$", re.IGNORECASE)

    @classmethod
    def task_of(cls, path: Path, tasks: dict[str, str]) -> str:
        """The task of a file: ``tasks[stem]``, else the lower-case stem less a split suffix."""
        return tasks.get(path.stem) or cls.SPLIT_SUFFIX.sub("", path.stem).lower()

    @classmethod
    def records(cls, path: Path, cfg: Any) -> tuple[list[str], list[dict[str, Any]]]:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadInput(f"{path}: not a JSON file ({exc})") from exc
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise BadInput(f"{path}: RouterDC files are a JSON list of objects, got a {type(rows).__name__}")
        rows = rows[:cfg.limit] if cfg.limit else rows
        return list(dict.fromkeys(k for r in rows for k in r)), rows

    @classmethod
    def read(cls, path: Path, columns: list[str], rows: list[dict[str, Any]], col: Any) -> None:
        require(path, columns, ["question", "scores"])
        task = cls.task_of(path, col.cfg.tasks)
        seen = list(dict.fromkeys(m for r in rows if isinstance(r.get("scores"), dict) for m in r["scores"]))
        models = col.cfg.targets if col.cfg.targets is not None else seen
        names = {m: col.target(m) for m in models if m in seen}
        for i, rec in enumerate(rows):
            try:
                question = rec.get("question")
                if not isinstance(question, str) or not question.strip():  # taken as is: never parsed as a list
                    raise BadRecord("empty question")
                messages = [{"role": "user", "content": question}]
                if not isinstance(rec.get("scores"), dict) or not rec["scores"]:
                    raise BadRecord("no scores")
            except BadRecord as exc:
                col.skip(path, str(exc), f"row {i}: {str(rec.get('question'))[:80]!r}")
                continue
            before = len(col.queries)
            q = col.query(messages, task, None)
            col.merged["duplicate prompts merged"] += len(col.queries) == before
            for model, name in names.items():
                col.observe(q, name, rec["scores"].get(model), None, None)


# format=decision-log lives in its own module (it reads logs, not files); importing it registers it.
import_module("training.data.import_log")
