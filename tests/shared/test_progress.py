"""Progress output: a bar on a terminal; readable log lines in a log file or a pipe."""

import logging

from shared.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "shared.progress"]


def test_a_pipe_gets_a_line_every_tenth_and_the_end_not_a_bar(caplog):
    caplog.set_level(logging.INFO, logger="shared.progress")
    with Progress(95, "capture", "queries", isatty=lambda: False) as p:
        assert p.bar is None
        for _ in range(19):
            p.update(5, "3 failed")
    got = lines(caplog)
    # steps of 9: logged on crossing 9, 18, ..., 90, then the end (95) once
    assert got[0] == "capture: 10/95 queries, 3 failed" and got[-1] == "capture: 95/95 queries, 3 failed"
    assert len(got) == 11 and all("\r" not in line for line in got)


def test_a_slow_trickle_is_logged_at_least_every_minute(caplog):
    caplog.set_level(logging.INFO, logger="shared.progress")
    clock = Clock()
    with Progress(1000, "labelling", "labels", clock=clock, isatty=lambda: False) as p:
        p.update(1)
        assert lines(caplog) == []
        clock.now = 61
        p.update(1)
        assert lines(caplog) == ["labelling: 2/1000 labels"]
    assert lines(caplog)[-1] == "labelling: 2/1000 labels" and len(lines(caplog)) == 1  # the end was just logged


def test_a_terminal_gets_a_bar_and_no_log_lines(caplog):
    caplog.set_level(logging.INFO, logger="shared.progress")
    with Progress(10, "capture", "queries", isatty=lambda: True) as p:
        assert p.bar is not None
        p.update(10, "all done")
        assert p.bar.n == 10
    assert lines(caplog) == []
    with Progress(10, "capture", "queries", bar=False, isatty=lambda: True) as quiet:
        assert quiet.bar is None  # bar=False (progress: false): log lines instead


def test_library_bars_are_off_in_a_pipe_and_restored_after():
    from transformers.utils import logging as hf_logging

    from shared.progress import library_bars_on_terminal

    assert hf_logging.is_progress_bar_enabled()
    with library_bars_on_terminal(isatty=lambda: False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    with library_bars_on_terminal(isatty=lambda: True):
        assert hf_logging.is_progress_bar_enabled()


def test_the_gguf_readers_own_tqdm_follows_the_same_rule():
    """The GGUF reader draws "Converting and de-quantizing GGUF tensors..." with tqdm itself,
    past transformers' switch: in a pipe it is drawn by transformers' tqdm (off), then restored."""
    import io

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from shared.progress import library_bars_on_terminal

    own = gguf_utils.tqdm
    with library_bars_on_terminal(isatty=lambda: False):
        out = io.StringIO()
        assert list(gguf_utils.tqdm(range(3), desc="Converting", file=out)) == [0, 1, 2]
        assert out.getvalue() == ""
    assert gguf_utils.tqdm is own
    with library_bars_on_terminal(isatty=lambda: True):
        assert gguf_utils.tqdm is own
