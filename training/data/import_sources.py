"""Readers of ``prefill-router data import`` (:mod:`training.data.importer`): files to queries.

:class:`Collector` merges source rows into queries keyed on a hash of the prompt text and
counts what it merged or skipped; :func:`read_routerbench` reads RouterBench's column scheme
(one row per prompt, ``<model>``, ``<model>|total_cost``, ...) from a CSV or a trusted
pickle, :func:`read_long` a long format (one row per prompt x model). Cells are parsed by
:func:`number`, :func:`text_of` and :func:`messages_of`, which raise :class:`BadRecord` with
the reason for a cell they cannot read (the row is then skipped and counted).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import BadInput, MissingInput
from training.queries import BadRecord, BuildReport, normalise, stable_hash
from training.semantic_text import prompt_text

from training.data.import_config import ImportConfig

EXTENSIONS = {"routerbench": (".csv", ".pkl", ".pickle"), "long": (".parquet", ".csv", ".jsonl", ".pkl", ".pickle")}
SOURCE = {"routerbench": "routerbench", "long": "import"}


class MissingColumn(BadInput):
    """An input file lacks a column the format needs."""


@dataclass
class Obs:
    """One observation of a (query, target): a RouterBench cell or a long-format row."""

    correct: float | None
    cost: float
    input_tokens: int
    output_tokens: int
    answer: str | None


@dataclass
class Query:
    """A query being built: its row (without split and meta), source ids, observations per target."""

    row: dict[str, Any]
    ids: list[str] = field(default_factory=list)
    obs: dict[str, list[Obs]] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading
def input_files(item: str, fmt: str) -> list[Path]:
    """The local files ``item`` names: itself, or a folder's files with the format's extensions, sorted."""
    path = Path(item).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS[fmt])
        if not found:
            raise MissingInput(f"no {'/'.join(EXTENSIONS[fmt])} files in folder {path}")
        return found
    if not path.is_file():
        raise MissingInput(f"input {path} not found")
    if path.suffix.lower() not in EXTENSIONS[fmt]:
        raise BadInput(f"{path}: the {fmt} format reads {', '.join(EXTENSIONS[fmt])} files")
    return [path]


def staged_inputs(inputs: list[str], fmt: str, folder: Path) -> list[tuple[str, Path]]:
    """``(name, local path)`` of every input file, in order. ``s3://`` files and folders (every
    object under the prefix with the format's extensions) are downloaded into ``folder`` first;
    the name is the URI, so the import manifest records where each file came from."""
    import pyarrow.fs as pafs

    from shared import storage

    out: list[tuple[str, Path]] = []
    for item in inputs:
        if not storage.is_s3(item):
            out += [(str(p), p) for p in input_files(item, fmt)]
            continue
        fs, path = storage.filesystem(item)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise MissingInput(f"{item}: no such object or prefix")
        found = [path] if info.type == pafs.FileType.File else sorted(
            f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=False))
            if f.type == pafs.FileType.File and Path(f.path).suffix.lower() in EXTENSIONS[fmt])
        if not found:
            raise MissingInput(f"no {'/'.join(EXTENSIONS[fmt])} files under {item}")
        for key in found:
            uri = f"s3://{key}"
            local = folder / f"{len(out):04d}-{Path(key).name}"
            local.write_bytes(storage.read_bytes(uri))
            out.append((uri, local))
    return out


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def read_records(path: Path, trust_pickle: bool, limit: int | None) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and row dicts of a CSV, pickled DataFrame, Parquet or JSONL file (first ``limit`` rows)."""
    import pandas as pd

    kind = path.suffix.lower()
    if kind in (".pkl", ".pickle"):
        if not trust_pickle:
            raise BadInput(f"{path} is a pickle: unpickling runs code stored in the file, so it is read only "
                             "with trust_pickle=true (set it only for a file from a source you trust)")
        frame = pd.read_pickle(path)
        if not isinstance(frame, pd.DataFrame):
            raise BadInput(f"{path} holds a {type(frame).__name__}, not a pandas DataFrame")
        frame = frame.head(limit) if limit else frame
    elif kind == ".csv":  # every cell as text: only an empty cell is missing ("NA" stays text)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=limit)
    elif kind == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        table = table.slice(0, limit) if limit else table
        return table.column_names, table.to_pylist()
    else:
        try:
            rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()][:limit]
        except json.JSONDecodeError as exc:
            raise BadInput(f"{path}: not JSON lines ({exc})") from exc
        return list(dict.fromkeys(k for r in rows for k in r)), rows
    return [str(c) for c in frame.columns], frame.to_dict("records")


def require(path: Path, columns: list[str], needed: list[str]) -> None:
    """Raise :class:`MissingColumn` naming the first absent column and listing the columns found."""
    for name in needed:
        if name not in columns:
            raise MissingColumn(f"{path}: missing required column {name!r}; columns found: {columns}")


def blank(value: Any) -> bool:
    """Whether a cell is empty: None, NaN, pandas NA or blank text."""
    if value is None or isinstance(value, str):
        return value is None or not value.strip()
    try:
        return math.isnan(value)
    except (TypeError, ValueError):  # a list, an array, pandas' NA
        return type(value).__name__ in ("NAType", "NaTType")


def number(value: Any, what: str, high: float = math.inf) -> float | None:
    """A cell as a float in ``[0, high]``; ``None`` when empty; :class:`BadRecord` otherwise."""
    if blank(value):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise BadRecord(f"{what} {value!r} is not a number") from None
    if not 0.0 <= out <= high:
        raise BadRecord(f"{what} {out} is not in [0, {high}]")
    return out


def text_of(value: Any, what: str) -> str:
    """A prompt or response cell as text: a Python-literal list of strings (joined) or a plain string."""
    if isinstance(value, str) and value.lstrip().startswith(("['", '["')):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            raise BadRecord(f"{what} is not a valid Python-literal list ({type(exc).__name__})") from None
    value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise BadRecord(f"{what} list holds non-strings")
        value = "\n\n".join(value)
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"empty {what}")
    return value


def messages_of(value: Any) -> list[dict[str, str]]:
    """A long-format ``messages`` cell (a list of {role, content}, or its JSON) as chat messages."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRecord("messages is not JSON") from None
    value = value.tolist() if hasattr(value, "tolist") else value
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in value):
        raise BadRecord("messages is not a non-empty list of {role, content}")
    if not any(m["content"].strip() for m in value):
        raise BadRecord("empty messages")
    return [{"role": str(m["role"]), "content": m["content"]} for m in value]


# --------------------------------------------------------------------------- collecting
class Collector:
    """Merges source rows into queries keyed on the prompt text; counts what it merged or skipped."""

    def __init__(self, cfg: ImportConfig, registry: Any):
        self.cfg, self.registry, self.source = cfg, registry, SOURCE[cfg.format]
        self.queries: dict[str, Query] = {}
        self.specs: dict[str, Any] = {}          # registry name -> ModelSpec
        self.labels: dict[str, Counter] = {}     # registry name -> cell counts
        self.merged: Counter = Counter()
        self.report = BuildReport()

    def target(self, model: str) -> str:
        """The registry name of a source model; an unknown name is an error saying how to fix it."""
        name = self.cfg.model_names.get(model, model)
        if name not in self.specs:
            try:
                self.specs[name] = self.registry.get(name)
            except KeyError as exc:
                raise BadInput(f"model {model!r} (registry name {name!r}) is not in the registry: add it there "
                                 f"or map it with model_names ({exc.args[0]})") from None
            self.labels[name] = Counter()
        return name

    def query(self, messages: list[dict[str, str]], task: str, source_id: str | None) -> Query:
        """The query of these messages, created on first sight (a repeat keeps the first task)."""
        qid = stable_hash(self.source, messages)
        q = self.queries.get(qid)
        if q is None:
            text = prompt_text(messages)
            q = self.queries[qid] = Query(row={
                "query_id": qid, "source": self.source, "task": task, "messages": messages, "reference": "",
                "answer_type": self.cfg.answer_types.get(task, "exact"), "choices": [],
                "group_id": stable_hash(self.source, normalise(text))})
        elif q.row["task"] != task:
            self.merged["task conflicts (first task kept)"] += 1
        if source_id is not None and source_id not in q.ids:
            q.ids.append(source_id)
        return q

    def observe(self, q: Query, target: str, correct: Any, cost: Any, answer: str | None,
                tokens: tuple[float, float] | None = None) -> None:
        """Record one (query, target) cell; never raises: bad cells are counted and kept as missing."""
        counts = self.labels[target]
        try:
            value = number(correct, "correctness", 1.0)
            counts["empty correctness cells" if value is None else "labelled cells"] += 1
        except BadRecord as exc:
            value = None
            counts[f"bad correctness cells, kept as missing ({exc})"] += 1
        per_char = 1.0 / self.cfg.chars_per_token
        prompt = sum(len(m["content"]) for m in q.row["messages"])
        n_in, n_out = tokens or (math.ceil(prompt * per_char), math.ceil(len(answer or "") * per_char))
        try:
            usd = number(cost, "cost")
        except BadRecord as exc:
            usd = None
            counts[f"bad cost cells ({exc})"] += 1
        if usd is None:
            usd = self.specs[target].cost(n_in, n_out)
            counts["costs from registry prices"] += 1
        if q.obs.get(target):
            self.merged[f"duplicate labels of {target}"] += 1
        q.obs.setdefault(target, []).append(Obs(value, usd, int(n_in), int(n_out), answer))

    def skip(self, path: Path, reason: str, detail: Any) -> None:
        self.report.skip(self.source, reason, f"{path.name}: {str(detail)[:200]}")


def read_routerbench(path: Path, columns: list[str], rows: list[dict], col: Collector) -> None:
    """RouterBench rows: ``prompt``, ``eval_name``, per model ``<model>`` in {0, 1} and
    ``<model>|total_cost``; optional ``sample_id`` and ``<model>|model_response``."""
    models = col.cfg.targets if col.cfg.targets is not None else list(col.cfg.model_names)
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


def read_long(path: Path, columns: list[str], rows: list[dict], col: Collector) -> None:
    """Long rows: ``prompt`` or ``messages``, ``model``, ``correct``, ``cost`` and/or ``input_tokens`` +
    ``output_tokens`` (no cost: registry prices); optional ``task`` and ``response``."""
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
