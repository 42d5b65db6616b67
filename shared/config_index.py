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
    "import-routerbench.yaml": "training.data_import:ImportConfig",
    "label.yaml": "training.label:LabelConfig",
    "label-quick.yaml": "training.label:LabelConfig",
    "cluster-local.yaml": "cluster.local:LocalClusterConfig",
    "evaluate.yaml": "training.evaluate:EvalConfig",
    "capture.yaml": "training.capture:CaptureConfig",
    "capture-quick.yaml": "training.capture:CaptureConfig",
    "capture-ref.yaml": "training.capture:CaptureConfig",
    "probe.yaml": "training.probe:ProbeConfig",
    "fit.yaml": "training.fit:FitConfig",
    "tune.yaml": "training.tune:TuneConfig",
    "serve-k8s.yaml": "serving.config:ServeConfig",
    "pipeline-small.yaml": "training.pipeline:PipelineConfig",
    "pipeline.yaml": "training.pipeline:PipelineConfig",
    "pipeline-ref.yaml": "training.pipeline:PipelineConfig",
    "pipeline-routerbench.yaml": "training.pipeline:PipelineConfig",
    "demo.yaml": "training.pipeline:PipelineConfig",
    "demo-quick.yaml": "training.pipeline:PipelineConfig",
    "serve-local.yaml": "serving.config:ServeConfig",
    "serve-routerbench.yaml": "serving.config:ServeConfig",
}


def schema_for(name: str) -> type:
    module, _, cls = CONFIG_SCHEMAS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
