"""``prefill-router label judge``: its config and its pure parts (no model, no Ray).

A judge (any registry target) reads a logged (prompt, response) pair through a prompt
template and answers with a verdict; a regex takes a number from the verdict and the score
scale maps it to ``[0, 1]``. A verdict with no number, or one outside the scale, is
*unparsable*: a missing label, never a 0. The run itself is :mod:`training.label.judge_run`.

The decisions a run judges are cut into shards (:func:`plan_shards`): the window's answered
``chat`` decisions whose prompt and response the log kept, ordered by (time, request id),
``shard_size`` at a time. Each shard becomes one feedback part of the log
(:func:`shard_part_uri`), named from a hash of the judge's identity (:func:`judge_identity`),
a hash of the shard's request ids and the shard's number, so a rerun finds the shards it
already wrote, and a shard whose members changed (an open window over a growing log) is a new
part, never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from shared import storage
from shared.backends import is_remote
from shared.config import StrictConfig
from shared.decision_log import FEEDBACK, logged_messages, part_uri, unix_time
from shared.registry import ModelSpec
from training.label.backends import OpenAIOptions
from training.label.pool import PoolConfig

FORMAT = 1  # bump when the judge's shards or verdicts change meaning: part of the identity
DEFAULT_TEMPLATE = """You are grading an AI assistant's answer to a user.

[User]
{prompt}

[Assistant's answer]
{response}

How correct and helpful is the answer, from 1 (wrong or useless) to 10 (fully correct and helpful)?
Reply with "Score: <number>" and nothing else."""
PLACEHOLDER = re.compile(r"\{(prompt|response)\}")


class ScaleConfig(StrictConfig):
    """The judge's score scale: a number in ``[min, max]`` maps linearly to ``[0, 1]``."""

    min: float = Field(1.0, description="The worst score the template asks for (maps to 0).")
    max: float = Field(10.0, description="The best score the template asks for (maps to 1).")

    @model_validator(mode="after")
    def _ordered(self) -> "ScaleConfig":
        if not self.min < self.max:
            raise ValueError(f"scale.min ({self.min}) must be below scale.max ({self.max})")
        return self


class JudgeConfig(StrictConfig):
    """Config of ``prefill-router label judge``."""

    log: str = Field(description="The decision log's URI (local or s3://): the folder holding decisions/ and "
                     "feedback/. The verdicts are written into its feedback/ folder.")
    judge: str = Field(description="The judge: a registry target (an OpenAI-compatible endpoint, or a local model).")
    registry: str | None = Field(None, description="Model registry YAML (None: configs/models.yaml).")
    since: float | None = Field(None, description="Judge the decisions logged at or after this time: unix seconds "
                                "or an ISO 8601 date or date/time (no zone: UTC); None: from the log's start.")
    until: float | None = Field(None, description="Judge the decisions logged before this time (same forms as "
                                "since); None: to the log's end (an open window: rerun to judge what came since).")
    system: str | None = Field(None, description="A system message sent before the template (None: none).")
    template: str = Field(DEFAULT_TEMPLATE, description="The judge's prompt: {prompt} becomes the logged chat (a "
                          "single user message as is, else one 'role: content' paragraph per message) and "
                          "{response} the logged answer; no other braces are read.")
    scale: ScaleConfig = Field(default_factory=ScaleConfig, description="The score scale the template asks for.")
    pattern: str = Field(r"(?i)score[\s:=*]*(-?\d+(?:\.\d+)?)", description="Regex with one group: the "
                         "verdict's number is the group of the first match; no match, or a number outside the "
                         "scale, is an unparsable verdict (no label).")
    max_new_tokens: int = Field(32, gt=0, description="Greedy tokens the judge may write per verdict.")
    skip_scored: bool = Field(True, description="Do not judge a request that already has a score from this judge "
                              "(source judge:<judge>) in the log, whatever its template.")
    skip_user_scored: bool = Field(True, description="Do not judge a request a user already scored (POST "
                                   "/v1/feedback): the judge fills in where feedback is missing, and the import "
                                   "prefers the user's score anyway (label_sources).")
    shard_size: int = Field(256, gt=0, description="Decisions per shard, one feedback part each (the unit of resume).")
    batch_size: int = Field(8, gt=0, description="Decisions per actor call (one Ray Data block each).")
    openai: OpenAIOptions = Field(default_factory=OpenAIOptions, description="HTTP settings of an openai judge.")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="Actor pool of a local-model judge.")
    openai_pool: PoolConfig = Field(
        default_factory=lambda: PoolConfig(num_cpus=0.25, max_actors=2),
        description="Actor pool of an openai judge (HTTP-bound: a fraction of a CPU).")
    use_gpu: bool | None = Field(None, description="Run a local judge on GPUs; None: when the cluster has any.")
    ray_address: str | None = Field(None, description="Ray cluster address (None: start or reuse a local one).")
    progress: bool = Field(True, description="Show a progress bar.")

    @field_validator("since", "until", mode="before")
    @classmethod
    def _unix_time(cls, value: Any) -> Any:
        return unix_time(value)

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, value: str) -> str:
        try:
            groups = re.compile(value).groups
        except re.error as exc:
            raise ValueError(f"pattern {value!r} is not a regex: {exc}") from None
        if groups != 1:
            raise ValueError(f"pattern {value!r} has {groups} groups; it needs exactly one (the number)")
        return value

    @model_validator(mode="after")
    def _check(self) -> "JudgeConfig":
        missing = [p for p in ("{prompt}", "{response}") if p not in self.template]
        if missing:
            raise ValueError(f"template lacks {' and '.join(missing)}")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(f"since ({self.since}) must be before until ({self.until})")
        if not self.judge.strip():
            raise ValueError("judge is empty: name a registry target")
        return self

    @property
    def source(self) -> str:
        """The ``source`` of this judge's feedback rows."""
        return f"judge:{self.judge}"

    def pool_for(self, spec: ModelSpec) -> PoolConfig:
        return self.openai_pool if is_remote(spec.backend) else self.pool


# --------------------------------------------------------------------------- verdicts
def render_prompt(messages: list[dict[str, str]]) -> str:
    """The logged chat as the judge reads it: one user message as is, else ``role: content`` paragraphs."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def render_template(template: str, prompt: str, response: str) -> str:
    """``template`` with ``{prompt}`` and ``{response}`` replaced in one pass (text holding them stays as is)."""
    values = {"prompt": prompt, "response": response}
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def judge_chat(cfg: JudgeConfig, messages: list[dict[str, str]], response: str) -> list[dict[str, str]]:
    """The chat sent to the judge for one logged (prompt, response)."""
    chat = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return chat + [{"role": "user", "content": render_template(cfg.template, render_prompt(messages), response)}]


def parse_verdict(text: str | None, pattern: str) -> float | None:
    """The number in the first match's group of ``pattern`` (None: no match, or not a number)."""
    match = re.search(pattern, text or "")
    if match is None or match.group(1) is None:
        return None
    try:
        return float(match.group(1))
    except ValueError:
        return None


def to_unit(value: float | None, scale: ScaleConfig) -> float | None:
    """``value`` on ``scale`` mapped to ``[0, 1]`` (None: missing, or outside the scale)."""
    if value is None or not scale.min <= value <= scale.max:
        return None
    return (value - scale.min) / (scale.max - scale.min)


def verdict_score(text: str | None, cfg: JudgeConfig) -> float | None:
    """The label a verdict gives, in ``[0, 1]``; None when it is unparsable (never a 0)."""
    return to_unit(parse_verdict(text, cfg.pattern), cfg.scale)


# --------------------------------------------------------------------------- shards
def judge_identity(spec: ModelSpec, cfg: JudgeConfig) -> dict[str, Any]:
    """What the judge's verdicts depend on; its hash names the parts."""
    from shared.models import model_fingerprint

    return {"judge": model_fingerprint(spec), "remote_model": spec.remote_model, "backend": spec.backend,
            "system": cfg.system, "template": cfg.template, "scale": cfg.scale.model_dump(), "pattern": cfg.pattern,
            "max_new_tokens": cfg.max_new_tokens, "since": cfg.since, "until": cfg.until,
            "shard_size": cfg.shard_size, "format": FORMAT}


def digest(obj: Any, n: int = 12) -> str:
    """The first ``n`` hex digits of sha256 of ``obj`` as canonical JSON."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def skip_reason(rec: dict[str, Any]) -> str | None:
    """Why a decision is not judged (None: it is an answered chat with its prompt and response kept)."""
    if rec["endpoint"] != "chat":
        return f"{rec['endpoint']} endpoint"
    if rec["status"] != 200:
        return "status not 200"
    if not (rec["messages"] or "").strip():
        return "no prompt kept"
    if not (rec["response"] or "").strip():
        return "no response kept"
    try:
        logged_messages(rec["messages"])
    except ValueError:
        return "unreadable messages"
    return None


def plan_shards(decisions: pa.Table, shard_size: int) -> tuple[list[list[dict[str, Any]]], dict[str, int]]:
    """The decisions to judge in shards of ``shard_size`` (ordered by time, then request id), and the
    others counted by reason (a repeated request id: the first is judged)."""
    skipped: dict[str, int] = {}
    kept, seen = [], set()
    rows = decisions.select(["request_id", "time", "endpoint", "status", "messages", "response"]).to_pylist()
    for rec in sorted(rows, key=lambda r: (r["time"], r["request_id"])):
        reason = "duplicate request id" if rec["request_id"] in seen else skip_reason(rec)
        seen.add(rec["request_id"])
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            kept.append({k: rec[k] for k in ("request_id", "time", "messages", "response")})
    return [kept[i:i + shard_size] for i in range(0, len(kept), shard_size)], skipped


def shard_part_uri(log: str, id_hash: str, shard: int, members: list[dict[str, Any]]) -> str:
    """The feedback part of one shard: in the day of its last decision, ``part-<that time>-judge-<identity
    hash>-<members hash>-<shard>.parquet`` (found by ``list_parts``; the same shard, the same name)."""
    members_hash = digest([m["request_id"] for m in members], 8)
    return part_uri(log, FEEDBACK, max(m["time"] for m in members), f"judge-{id_hash}-{members_hash}", shard)


def side_dir(log: str, id_hash: str) -> str:
    """The run's own files beside the log (identity, summary, unparsable verdicts, failed shards)."""
    return storage.join(log, "judge", id_hash)
