"""Capture's progress in a log or pipe (no bar, even with ``progress: true``): a line every ~10%
of the queries, and at least once a minute while batches arrive, so a slow encoder's job shows
it is alive (the lines come from :mod:`shared.progress`)."""

import io
import logging

import numpy as np

import shared.progress
import training.capture.run as capture

LOGGER = shared.progress.log.name


class Batches:
    """Stands in for the Ray Data pipeline: ``iter_batches`` yields result batches of ``size`` rows."""

    def __init__(self, n_batches: int, size: int):
        self.n_batches, self.size = n_batches, size

    def iter_batches(self, **_):
        for _ in range(self.n_batches):
            ones = np.ones(self.size, dtype=np.int64)
            yield {"query_id": np.array(["q"] * self.size), "n_tokens": 10 * ones, "_computed": 2 * ones,
                   "_padded": 0 * ones, "truncated": np.zeros(self.size, dtype=bool)}


class Sink:
    def __init__(self):
        self.rows = 0

    def add(self, batch):
        self.rows += len(batch["query_id"])


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("capture: ")]


def test_a_line_every_tenth_of_the_queries(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    sink = Sink()
    counts = capture._stream(Batches(20, 5), sink, total=100, show=False)
    assert sink.rows == counts["rows"] == 100 and counts["tokens"] == 1000 and counts["computed"] == 200
    lines = progress_lines(caplog)
    assert len(lines) == 10 and lines[0] == "capture: 10/100 queries, 100 prompt tokens, 20% of them computed"
    assert lines[-1].startswith("capture: 100/100 queries")


def test_a_slow_capture_still_logs_once_a_minute(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = iter(range(0, 10_000, 61))                       # every batch arrives 61 s after the last
    monkeypatch.setattr(shared.progress.time, "monotonic", lambda: next(clock))
    capture._stream(Batches(3, 1), Sink(), total=100, show=False)   # 3% of the queries, 3 minutes
    assert [line.split(",")[0] for line in progress_lines(caplog)] == [
        "capture: 1/100 queries", "capture: 2/100 queries", "capture: 3/100 queries"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_on_a_terminal_and_log_lines_in_a_pipe(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=LOGGER)
    capture._stream(Batches(4, 5), Sink(), total=20, show=True)  # pytest's stderr is no terminal
    assert [line.split(",")[0] for line in progress_lines(caplog)] == [f"capture: {n}/20 queries" for n in (5, 10, 15, 20)]
    caplog.clear()
    terminal = Terminal()
    monkeypatch.setattr(shared.progress.sys, "stderr", terminal)
    capture._stream(Batches(4, 5), Sink(), total=20, show=True)
    assert progress_lines(caplog) == [] and "20/20" in terminal.getvalue()
