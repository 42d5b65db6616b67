"""Progress of a long loop, readable wherever its output goes.

On a terminal: a tqdm bar. In a log file or a pipe (a Ray job's log, ``| tee``, CI) a bar's
carriage returns would pile up into one endless line, so there it is a log line every ~10%
of the total and at least once a minute while work arrives, plus one at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


def on_terminal() -> bool:
    """Whether progress bars may be drawn: stderr is a terminal, not a log file or a pipe."""
    return sys.stderr.isatty()


# Library modules that draw a bar with tqdm itself, past transformers' switch: (module, name of its tqdm).
# The GGUF reader's "Converting and de-quantizing GGUF tensors..." at every conversion is one.
PLAIN_TQDM = (("transformers.modeling_gguf_pytorch_utils", "tqdm"),)


@contextmanager
def library_bars_on_terminal(isatty: Callable[[], bool] | None = None) -> Iterator[None]:
    """Within the block, transformers' own tqdm bars ("Loading weights" when a model loads,
    "Writing model shards" when one is saved, the GGUF reader's at a conversion) are drawn only
    on a terminal, as :class:`Progress` does; elsewhere they are off, and the library's setting
    is restored afterwards. The rule is about the process's stderr: a child process that
    inherits the user's stderr (the spawned converter of ``shared.models.prepare_models``)
    follows it as its parent does."""
    import importlib

    from transformers.utils import logging as hf_logging

    if (isatty or on_terminal)() or not hf_logging.is_progress_bar_enabled():
        yield
        return
    plain = []  # (module, attribute, the library's own tqdm), put back afterwards
    for name, attr in PLAIN_TQDM:
        module = importlib.import_module(name)
        plain.append((module, attr, getattr(module, attr)))
    hf_logging.disable_progress_bar()
    for module, attr, _ in plain:
        setattr(module, attr, hf_logging.tqdm)  # transformers' own tqdm: off with the switch above
    try:
        yield
    finally:
        for module, attr, bar in plain:
            setattr(module, attr, bar)
        hf_logging.enable_progress_bar()


class Progress:
    """``with Progress(total, "capture", "q") as p: p.update(n, detail="...")``."""

    def __init__(self, total: int, desc: str, unit: str, bar: bool = True, every_s: float = 60.0,
                 clock: Callable[[], float] | None = None, isatty: Callable[[], bool] | None = None):
        clock = clock or time.monotonic
        self.total, self.desc, self.unit, self.every_s, self.clock = total, desc, unit, every_s, clock
        self.done, self.detail, self.logged = 0, "", 0
        self.step = max(1, total // 10)
        self.next_log, self.last_log = self.step, clock()
        tty = (isatty or on_terminal)()
        self.bar: Any = None
        if bar and tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def update(self, n: int, detail: str = "") -> None:
        """``n`` more items done; ``detail`` (e.g. "3 failed") goes beside the count."""
        self.done += n
        self.detail = detail
        if self.bar is not None:
            self.bar.update(n)
            if detail:
                self.bar.set_postfix_str(detail)
        elif self.done >= self.next_log or self.clock() - self.last_log >= self.every_s:
            self.next_log = (self.done // self.step + 1) * self.step
            self.last_log = self.clock()
            self._log()

    def _log(self) -> None:
        extra = f", {self.detail}" if self.detail else ""
        self.logged = self.done
        log.info("%s: %d/%d %s%s", self.desc, self.done, self.total, self.unit, extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done != self.logged:  # the end, unless the last update logged it
            self._log()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
