"""Which schema each shipped YAML under ``configs/`` follows (a test validates them all).

A new YAML file must be added here, or the config test fails.
"""

from __future__ import annotations

import importlib
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

# file name (relative to configs/) -> "module:Class"
CONFIG_SCHEMAS: dict[str, str] = {
    "models.yaml": "shared.registry:ModelRegistry",
    "data.yaml": "training.data.build:DataConfig",
    "data-quick.yaml": "training.data.build:DataConfig",
    "import-routerbench.yaml": "training.data.import_config:ImportConfig",
    "label.yaml": "training.label.run:LabelConfig",
    "label-quick.yaml": "training.label.run:LabelConfig",
    "judge.yaml": "training.label.judge:JudgeConfig",
    "cluster-local.yaml": "cluster.local:LocalClusterConfig",
    "evaluate.yaml": "training.evaluate.run:EvalConfig",
    "evaluate-routerdc.yaml": "training.evaluate.run:EvalConfig",
    "capture.yaml": "training.capture.run:CaptureConfig",
    "capture-quick.yaml": "training.capture.run:CaptureConfig",
    "capture-ref.yaml": "training.capture.run:CaptureConfig",
    "probe.yaml": "training.fit.probe:ProbeConfig",
    "fit.yaml": "training.fit.run:FitConfig",
    "adapt-routerdc.yaml": "training.adapt.run:AdaptConfig",
    "tune.yaml": "training.fit.tune:TuneConfig",
    "serve-k8s.yaml": "serving.config:ServeConfig",
    "pipeline-small.yaml": "cluster.pipeline.config:PipelineConfig",
    "pipeline.yaml": "cluster.pipeline.config:PipelineConfig",
    "pipeline-ref.yaml": "cluster.pipeline.config:PipelineConfig",
    "pipeline-routerbench.yaml": "cluster.pipeline.config:PipelineConfig",
    "pipeline-routerdc.yaml": "cluster.pipeline.config:PipelineConfig",
    "pipeline-from-logs.yaml": "cluster.pipeline.config:PipelineConfig",
    "demo.yaml": "cluster.pipeline.config:PipelineConfig",
    "demo-quick.yaml": "cluster.pipeline.config:PipelineConfig",
    "serve-local.yaml": "serving.config:ServeConfig",
    "serve-routerbench.yaml": "serving.config:ServeConfig",
}


def schema_for(name: str) -> type:
    module, _, cls = CONFIG_SCHEMAS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
