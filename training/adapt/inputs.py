"""The adapt stage's inputs from a capture: each row's window of layer-``L`` token states (the capture's
``token_layers``), its prompt length and labels, as :class:`training.adapt.model.AdaptInputs`."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.errors import BadInput
from training.adapt.model import AdaptInputs
from training.dataset import RoutingData


def load_windows(cfg: Any, data: RoutingData) -> tuple[AdaptInputs, int]:
    """``(rows, window)`` for an adapt config ``cfg`` (its ``activations``, ``from_layer`` and ``window``): every
    row's window of layer ``from_layer`` (in ``data``'s order) with its prompt length and labels (``dense``
    empty); refuses a capture without that layer's token states, or a window over its ``token_window``."""
    from training.token_states import read_token_windows

    if not len(data.n_tokens):
        raise BadInput(f"{cfg.activations} has no n_tokens column: the windows' positions need each prompt's length")
    _, states, mask = read_token_windows(cfg.activations, cfg.from_layer, cfg.window, list(data.query_ids))
    n = len(data.query_ids)
    return AdaptInputs(states, mask, np.asarray(data.n_tokens, dtype=np.int64), np.zeros((n, 0), np.float32),
                       data.Y), mask.shape[1]
