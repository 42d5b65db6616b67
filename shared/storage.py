"""Local paths and ``s3://bucket/prefix`` URIs behind one small API (pyarrow filesystems).

S3 settings come from the usual AWS environment variables; ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` points at a non-AWS S3 server (MinIO, a loopback moto server).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shared.errors import BadInput, MissingInput


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_options() -> dict[str, Any]:
    """Keyword arguments for :class:`pyarrow.fs.S3FileSystem` from the environment."""
    opts: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1"))}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        opts["endpoint_override"] = host.rstrip("/") if host else endpoint
        opts["scheme"] = scheme if host else "https"
    return opts


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or an ``s3://`` URI."""
    uri = str(uri)
    if is_s3(uri):
        return pafs.S3FileSystem(**s3_options()), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the ``s3://`` scheme."""
    return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; local writes go through a temp file and a rename (atomic)."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    Path(tmp).write_bytes(data)
    os.replace(tmp, path)


def delete(uri: str) -> None:
    """Delete one file or object if it is there."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as src:
            return src.read()
    except FileNotFoundError as exc:
        raise MissingInput(f"not found: {uri}") from exc


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_parquet(table: pa.Table, uri: str) -> None:
    """Write one Parquet file deterministically (same table, same bytes) and atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_statistics=True, store_schema=True)
    write_bytes(uri, sink.getvalue().to_pybytes())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise MissingInput(f"not found: {uri}")
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except pa.ArrowInvalid as exc:  # not Parquet, or without the columns asked for
        raise BadInput(str(exc)) from exc
