"""What every format of ``prefill-router data import`` reads with: input files, their rows, their cells.

:func:`staged_inputs` finds a format's input files (local, or ``s3://`` copied locally) and
:func:`read_records` reads a CSV, pickled DataFrame, Parquet or JSONL file into row dicts. The
formats (:mod:`training.data.import_formats`) parse cells with :func:`number`, :func:`text_of`
and :func:`messages_of`, which raise :class:`BadRecord` with the reason for a cell they cannot
read (the row is then skipped and counted), and check columns with :func:`require`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from shared.errors import BadInput, MissingInput
from shared.decision_log import logged_messages
from training.queries import BadRecord


class MissingColumn(BadInput):
    """An input file lacks a column the format needs."""


# --------------------------------------------------------------------------- reading
def input_files(item: str, fmt: str, extensions: tuple[str, ...]) -> list[Path]:
    """The local files ``item`` names: itself, or a folder's files with the format's ``extensions``, sorted."""
    path = Path(item).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        if not found:
            raise MissingInput(f"no {'/'.join(extensions)} files in folder {path}")
        return found
    if not path.is_file():
        raise MissingInput(f"input {path} not found")
    if path.suffix.lower() not in extensions:
        raise BadInput(f"{path}: the {fmt} format reads {', '.join(extensions)} files")
    return [path]


def staged_inputs(inputs: list[str], fmt: str, extensions: tuple[str, ...], folder: Path) -> list[tuple[str, Path]]:
    """``(name, local path)`` of every input file of format ``fmt``, in order. ``s3://`` files and
    folders (every object under the prefix with the format's ``extensions``) are downloaded into
    ``folder`` first; the name is the URI, so the import manifest records where each file came from."""
    import pyarrow.fs as pafs

    from shared import storage

    out: list[tuple[str, Path]] = []
    for item in inputs:
        if not storage.is_s3(item):
            out += [(str(p), p) for p in input_files(item, fmt, extensions)]
            continue
        fs, path = storage.filesystem(item)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise MissingInput(f"{item}: no such object or prefix")
        found = [path] if info.type == pafs.FileType.File else sorted(
            f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=False))
            if f.type == pafs.FileType.File and Path(f.path).suffix.lower() in extensions)
        if not found:
            raise MissingInput(f"no {'/'.join(extensions)} files under {item}")
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
            # split on "\n" only: str.splitlines() also breaks at U+0085, U+2028, U+2029 inside a JSON string
            rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()][:limit]
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
    try:
        return logged_messages(value)
    except ValueError as exc:
        raise BadRecord(str(exc)) from None
