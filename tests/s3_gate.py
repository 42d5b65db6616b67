"""A second door into the tests' moto S3 that can hold shard uploads: kill tests that land mid-run every time.

A job killed "once the first shard appears" only lands mid-run if the next shard is not written before
the kill does: a race. :class:`ShardGate` serves the same moto backend (moto's state is per process, so
the buckets are the ones the ``moto_s3`` fixture serves) on a port of its own, through a WSGI middleware
that lets the first ``allow`` shard uploads pass and holds the next one until the test says. A job
pointed at it (``AWS_ENDPOINT_URL_S3``) is then stopped, by the test, at a known point: ``allow``
shards finished, one upload in flight. Every upload it saw is recorded, so a resumed run through it
shows which shards it rewrote.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Iterator

SHARD = re.compile(r"/shard-(\d+)\.parquet$")


class ShardGate:
    """WSGI middleware: pass everything, hold uploads of shards beyond the first ``allow``.

    ``mode`` is ``"hold"`` (a shard upload beyond ``allow`` waits), ``"pass"`` (everything goes
    through) or ``"refuse"`` (held and later shard uploads get a 503, as a storage outage would).
    """

    def __init__(self, app: Any, allow: int = 1):
        self.app, self.allow, self.mode = app, allow, "hold"
        self.writes: list[str] = []  # every shard upload seen, in order: "<path>" (multipart parts repeat)
        self.passed: set[str] = set()
        self.holding = threading.Event()
        self._changed = threading.Condition()

    def __call__(self, environ: dict, start_response: Any) -> Iterator[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ["REQUEST_METHOD"] in ("PUT", "POST") and SHARD.search(path):
            self.writes.append(path)
            if not self._let_through(path):
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"refused by the test's shard gate"]
        return self.app(environ, start_response)

    def _let_through(self, path: str) -> bool:
        with self._changed:
            if path in self.passed or (self.mode == "hold" and len(self.passed) < self.allow):
                self.passed.add(path)
                return True
            while self.mode == "hold":
                self.holding.set()
                self._changed.wait()
            if self.mode == "pass":
                self.passed.add(path)
            return self.mode == "pass"

    def set_mode(self, mode: str) -> None:
        assert mode in ("hold", "pass", "refuse")
        with self._changed:
            self.mode = mode
            self._changed.notify_all()

    def wait_holding(self, timeout_s: float, alive: Any = lambda: True) -> None:
        """Block until an upload is held; ``alive()`` false (the job ended) fails at once."""
        import time

        deadline = time.monotonic() + timeout_s
        while not self.holding.wait(0.2):
            assert alive(), f"the job ended before a shard upload was held (uploads: {self.writes})"
            assert time.monotonic() < deadline, f"no shard upload held within {timeout_s} s"


class GatedS3:
    """A loopback server for the in-process moto backend, behind a :class:`ShardGate`."""

    def __init__(self, allow: int = 1):
        from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                                   create_backend_app)
        from werkzeug.serving import make_server

        self.gate = ShardGate(DomainDispatcherApplication(create_backend_app), allow)
        self.server = make_server("127.0.0.1", 0, self.gate, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "GatedS3":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.gate.set_mode("refuse")  # let held uploads go (as 503s) before the server stops
        self.server.shutdown()
        self.thread.join(10)
