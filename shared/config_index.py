"""Which schema each shipped YAML under ``configs/`` follows (a test validates them all).

A new YAML file must be added here, or the config test fails.
"""

from __future__ import annotations

import importlib
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# file name (relative to configs/) -> "module:Class"
CONFIG_SCHEMAS: dict[str, str] = {
    "models.yaml": "shared.registry:ModelRegistry",
    "data.yaml": "training.data:DataConfig",
    "data-quick.yaml": "training.data:DataConfig",
}


def schema_for(name: str) -> type:
    module, _, cls = CONFIG_SCHEMAS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
