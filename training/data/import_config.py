"""Config of ``prefill-router data import`` (:class:`ImportConfig`) and the RouterBench names it maps."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from shared.config import StrictConfig
from shared.decision_log import unix_time
from training.queries import ANSWER_TYPES


ANSWER_TYPE_DEFAULTS = {"arc-challenge": "multiple_choice", "winogrande": "multiple_choice", "mbpp": "code",
                        "mmlu": "multiple_choice", "hellaswag": "multiple_choice", "gsm8k": "numeric",
                        "cmmlu": "multiple_choice", "arc_challenge": "multiple_choice", "humaneval": "code"}


LOG_ONLY = ("since", "until", "label_sources")  # options only format=decision-log reads


class ImportConfig(StrictConfig):
    """Config of ``prefill-router data import``."""

    format: str = Field("routerbench", description="Input format, a class registered in "
                        "training/data/import_formats.py: "
                        "routerbench: a row per prompt, columns per model; long: a row per prompt x model; "
                        "routerdc: RouterDC's JSON lists of {question, scores}, the task from the file name; "
                        "decision-log: the Serve app's decision log with its feedback and judge scores.")
    inputs: list[str] = Field(description="Input files or folders, local or s3:// (a folder or prefix: its files "
                              "of the format's extensions; decision-log: the log's URI, the folder holding "
                              "decisions/ and feedback/).")
    output: str = Field("runs/import/queries.parquet", description="Query table to write (local or s3://).")
    labels: str = Field("runs/import/labels", description="Label folder to write, one sub-folder per target.")
    seed: int = Field(0, description="Seed of the split assignment.")
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.7, "val": 0.1, "test": 0.2},
                                     description="Split fractions of train, val and test; they sum to 1.")
    registry: str | None = Field(None, description="Registry YAML holding every target (None: configs/models.yaml).")
    model_names: dict[str, str] | None = Field(None, description="Source model name -> registry name; unlisted "
                                               "names are kept (None: the format's own map, e.g. RouterBench's 11 "
                                               "or RouterDC's 7 models; long: RouterBench's; decision-log: none, "
                                               "its targets are registry names).")
    targets: list[str] | None = Field(None, description="Source model names to import, each required in the input "
                                      "(None: routerbench every model of model_names, long, routerdc and "
                                      "decision-log every model found).")
    tasks: dict[str, str] = Field(default_factory=dict, description="routerdc: file name (without .json) -> task; "
                                  "other files: the name less a _train/-test/... suffix, e.g. gsm8k-train -> gsm8k.")
    answer_types: dict[str, str] = Field(default_factory=lambda: dict(ANSWER_TYPE_DEFAULTS),
                                         description="answer_type recorded per task (other tasks: exact).")
    default_task: str = Field("general", min_length=1, description="Task of long-format rows without a task column "
                              "and of every decision-log query.")
    chars_per_token: float = Field(4.0, gt=0, description="Characters per token where token counts are estimated.")
    shard_size: int = Field(256, gt=0, description="Queries per label shard (as label run).")
    limit: int | None = Field(None, gt=0, description="Read at most N rows of each input file (decision-log: N "
                              "decisions of each log; smoke runs).")
    trust_pickle: bool = Field(False, description="Read pickle inputs; unpickling runs code stored in the file.")
    since: float | None = Field(None, description="decision-log: import the decisions logged at or after this time, "
                                "unix seconds or an ISO 8601 date or date/time (no zone: UTC); feedback is read "
                                "from this time on (None: from the log's start). Refused by other formats.")
    until: float | None = Field(None, description="decision-log: import the decisions logged before this time "
                                "(same forms as since; None: to the log's end); feedback after it still counts. "
                                "Refused by other formats.")
    label_sources: list[str] = Field(default_factory=lambda: ["user", "judge"], description="decision-log: where a "
                                     "decision's label comes from, first match wins: `user` (POST /v1/feedback), "
                                     "`judge` (any other source) or one judge's name; the label is the mean score "
                                     "of the first entry that scored the decision. Refused by other formats.")

    @field_validator("since", "until", mode="before")
    @classmethod
    def _unix_time(cls, value: Any) -> Any:
        return unix_time(value)

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        from training.data.import_formats import FORMATS

        if value not in FORMATS:
            raise ValueError(f"unknown format {value!r}; known: {', '.join(FORMATS)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> "ImportConfig":
        problems = []
        if not self.inputs:
            problems.append("inputs is empty: name at least one file or folder")
        if set(self.splits) != {"train", "val", "test"} or any(v < 0 for v in self.splits.values()) or abs(
                sum(self.splits.values()) - 1.0) > 1e-6:
            problems.append(f"splits must be train, val and test, non-negative, summing to 1; got {self.splits}")
        if any(a not in ANSWER_TYPES for a in self.answer_types.values()):
            problems.append(f"answer_types {self.answer_types}: each must be one of {ANSWER_TYPES}")
        log_only = [k for k in LOG_ONLY if getattr(self, k) != type(self).model_fields[k].get_default(
            call_default_factory=True)]
        if self.format != "decision-log" and log_only:
            problems.append(f"{', '.join(log_only)}: only format=decision-log reads them, not format={self.format}")
        if self.since is not None and self.until is not None and self.since >= self.until:
            problems.append(f"since ({self.since}) must be before until ({self.until})")
        if not self.label_sources or len(set(self.label_sources)) != len(self.label_sources) or not all(
                s.strip() for s in self.label_sources):
            problems.append(f"label_sources {self.label_sources}: name at least one source, each once")
        if any(not n or "/" in n or n != n.strip() for n in self.names.values()):
            problems.append(f"model_names {self.names}: registry names must be folder-safe (no '/')")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def names(self) -> dict[str, str]:
        """Source model name -> registry name: ``model_names``, or the format's default map."""
        from training.data.import_formats import get_format

        return self.model_names if self.model_names is not None else dict(get_format(self.format).model_names)
