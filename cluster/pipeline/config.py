"""The pipeline's config (:class:`PipelineConfig`): every stage's config in one file, with the
paths between stages wired under ``work_dir`` (:func:`wiring`). A wired key (e.g.
``label.out``) may not be set to anything else."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from shared import storage
from shared.config import StrictConfig
from cluster.pipeline.publish import PublishConfig
from training.adapt.run import AdaptConfig
from training.capture.run import CaptureConfig
from training.data.build import DataConfig
from training.data.import_config import ImportConfig
from training.evaluate.run import EvalConfig
from training.fit.probe import ProbeConfig
from training.fit.run import FitConfig
from training.fit.tune import TuneConfig
from training.label.judge import JudgeConfig
from training.label.run import LabelConfig


DEFAULT_WORK = "runs/pipeline"


def wiring(raw: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``(wired, defaults)`` per stage section: paths between stages (fixed) and overridable defaults."""
    work = str(raw.get("work_dir") or DEFAULT_WORK)
    built = raw.get("data") is not None or raw.get("data_import") is not None
    queries = storage.join(work, "queries.parquet") if built else raw.get("queries")
    acts, router = (storage.join(work, p) for p in ("activations", "router"))
    labels = raw.get("labels") or storage.join(work, "labels")
    common = {"registry": raw.get("registry"), "ray_address": raw.get("ray_address")}
    targets = raw.get("targets")
    wired = {
        "label": {"queries": queries, "out": labels, "targets": targets, **common},
        "capture": {"queries": queries, "out": acts, **common},
        "probe": {"activations": acts, "labels": labels, "targets": targets, "out": storage.join(work, "probe")},
        "tune": {"activations": acts, "labels": labels, "targets": targets, "queries": queries,
                 "probe_report": storage.join(work, "probe", "probe.json"), "out": storage.join(work, "tune")},
        "fit": {"activations": acts, "labels": labels, "targets": targets, "out": router, **common},
        "evaluate": {"artifact": router, "activations": acts, "labels": labels, "queries": queries,
                     "out": storage.join(work, "eval")},
    }
    if raw.get("data") is not None:
        wired["data"] = {"output": queries}
    if raw.get("data_import") is not None:
        wired["data_import"] = {"output": queries, "labels": labels, "registry": raw.get("registry")}
    if raw.get("judge") is not None:
        wired["judge"] = common
    if raw.get("tune") is not None:
        wired["fit"]["tune_report"] = storage.join(work, "tune", "tune.json")
    if raw.get("adapt") is not None:
        wired["adapt"] = {"activations": acts, "labels": labels, "targets": targets,
                          "out": storage.join(work, "router-adapted"), "registry": raw.get("registry"),
                          "tune_report": storage.join(work, "tune", "tune.json"), "cv_out": storage.join(work, "adapt")}
    defaults = {"label": {"progress": False}, "capture": {"progress": False},
                "fit": {"probe_report": storage.join(work, "probe", "probe.json"),
                        "train": {"storage_path": storage.join(work, "ray-train")}}}
    if raw.get("adapt") is not None and "tolerance" in (raw.get("fit") or {}):
        defaults["adapt"] = {"tolerance": raw["fit"]["tolerance"]}   # the adapted artifact routes as fit's would
    return wired, defaults


def check_adapt(raw: dict[str, Any]) -> None:
    """An adapt section needs tune's report to compete with and the capture's token states of its layer."""
    adapt = raw.get("adapt")
    if adapt is None:
        return
    if raw.get("tune") is None:
        raise ValueError("adapt competes with tune's choice on tune's folds: add a `tune` section")
    layer, kept = (adapt or {}).get("from_layer"), (raw.get("capture") or {}).get("token_layers") or []
    if layer is not None and layer not in kept:
        raise ValueError(f"adapt.from_layer={layer} reads that layer's token states: set capture.token_layers "
                         f"to include {layer} (now {kept}) and capture.token_window to at least adapt.window")
    window = (adapt or {}).get("window")
    captured = (raw.get("capture") or {}).get("token_window") or CaptureConfig.model_fields["token_window"].default
    if window is not None and window > captured:
        raise ValueError(f"adapt.window={window} exceeds capture.token_window={captured}: raise the capture's window")


def uncaptured(blocks: list[str], capture: CaptureConfig) -> list[str]:
    """The ``blocks`` (explicit tune candidates', adapt's frozen ones) that ``capture`` does not write: a vector
    block whose layer or pooling it leaves out, an ``h{layer}_attn`` block whose layer's token states it keeps not."""
    from shared.features import is_attn, parse_block

    layers = None if capture.layers == "all" else set(capture.layers)
    missing = []
    for name in blocks:
        layer, pooling = parse_block(name)
        kept = layer in capture.token_layers if is_attn(name) else \
            (layers is None or layer in layers) and pooling in capture.poolings
        missing += [] if kept else [name]
    return missing


class PipelineConfig(StrictConfig):
    """Config of ``prefill-router pipeline run`` (and of ``prefill-router submit run``)."""

    work_dir: str = Field(DEFAULT_WORK, description="Local directory of every intermediate output (resume state).")
    targets: list[str] = Field(min_length=1, description="Targets labelled, probed, fitted and evaluated.")
    registry: str | None = Field(None, description="Model registry YAML (None: configs/models.yaml).")
    ray_address: str | None = Field(None, description="Ray address; None: RAY_ADDRESS (in a Ray job) or a local Ray.")
    queries: str | None = Field(None, description="An existing query table (local or s3://), instead of `data`.")
    data: DataConfig | None = Field(None, description="Build the query table (its `output` is wired).")
    judge: JudgeConfig | None = Field(
        None, description="Judge the logged answers that have no feedback first (`prefill-router label judge`), "
        "so the import finds their verdicts; its `log` must be one of data_import.inputs (format decision-log).")
    data_import: ImportConfig | None = Field(
        None, description="Import the query table and every target's labels from tables people already have "
        "(RouterBench, a long format; `prefill-router data import`); its outputs are wired and nothing is labelled.")
    labels: str | None = Field(None, description="Existing labels (e.g. the committed data/labels) to reuse "
                                                 "instead of labelling; they must cover every target.")
    label: LabelConfig = Field(default_factory=dict, description="Labelling (paths and targets are wired).")
    capture: CaptureConfig = Field(default_factory=dict, description="Activation capture (paths are wired).")
    probe: ProbeConfig = Field(default_factory=dict, description="Layer probes (paths and targets are wired).")
    tune: TuneConfig | None = Field(None, description="Choose the blocks and PCA size by cross-validation "
                                    "(paths and targets are wired); fit then uses its choice. None: no tune stage.")
    fit: FitConfig = Field(default_factory=dict, description="Router fit (paths and targets are wired).")
    adapt: AdaptConfig | None = Field(
        None, description="An adapted encoder as one more candidate (needs `tune`, and capture.token_layers with "
        "adapt.from_layer): cross-validated on tune's folds and score after fit; when it beats tune's choice its "
        "artifact (work_dir/router-adapted) is evaluated and published instead of fit's. None: no adapt stage.")
    evaluate: EvalConfig = Field(default_factory=dict, description="Evaluation (paths are wired).")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="Where and when to publish.")

    @model_validator(mode="before")
    @classmethod
    def _wire(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        sources = [k for k in ("data", "data_import", "queries") if raw.get(k)]
        if len(sources) != 1:
            raise ValueError("give exactly one of `data` (build the query table), `data_import` (import it with "
                             f"its labels) or `queries` (an existing one); got {sources or 'none'}")
        if raw.get("data_import") and raw.get("labels"):
            raise ValueError("`data_import` writes the labels: remove `labels`")
        if storage.is_s3(str(raw.get("work_dir") or "")):
            raise ValueError("work_dir must be a local directory (publish.uri may be s3://)")
        if raw.get("tune") is not None and (raw.get("fit") or {}).get("blocks"):
            raise ValueError("fit.blocks is set, so the tune stage's choice would be ignored: remove one of them")
        check_adapt(raw)
        wired, defaults = wiring(raw)
        judged = (raw.get("judge") or {}).get("log")
        if judged and judged not in ((raw.get("data_import") or {}).get("inputs") or []):
            raise ValueError(f"judge.log {judged!r} is not among data_import.inputs: the verdicts would not be imported")
        for stage in ("judge", "data", "data_import", "label", "capture", "probe", "tune", "fit", "adapt", "evaluate"):
            if stage in ("judge", "data", "data_import", "tune", "adapt") and raw.get(stage) is None:
                continue
            section = dict(raw.get(stage) or {})
            clash = sorted(k for k, v in wired.get(stage, {}).items() if k in section and section[k] != v)
            if clash:
                raise ValueError(f"{', '.join(f'{stage}.{k}' for k in clash)}: set by the pipeline "
                                 "(from work_dir, targets, registry, ray_address); remove it")
            for key, value in defaults.get(stage, {}).items():
                section[key] = {**value, **(section.get(key) or {})} if isinstance(value, dict) else \
                    section.get(key, value)
            raw[stage] = {**section, **wired.get(stage, {})}
        return raw

    @model_validator(mode="after")
    def _captured(self) -> "PipelineConfig":
        """Blocks named outright must be captured: found now, not after the capture has run."""
        named = [b for c in (self.tune.candidates if self.tune else []) if c.blocks != "probe"
                 for b in c.blocks if b != "minilm"] + (self.adapt.frozen_blocks if self.adapt else [])
        missing = uncaptured(list(dict.fromkeys(named)), self.capture)
        if missing:
            raise ValueError(f"{missing} (named by tune.candidates or adapt.frozen_blocks) would not be captured: "
                             f"capture.layers={self.capture.layers}, poolings={self.capture.poolings}, token_layers="
                             f"{self.capture.token_layers}; add their layers (an h<layer>_attn block's to "
                             "capture.token_layers) or drop those candidates")
        return self
