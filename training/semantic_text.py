"""The text a semantic baseline embeds (one definition for ``evaluate`` and ``tune``).

MiniLM reads at most 256 word pieces (about 1,000 characters) from the start of a text. When
the prompts of a task share a long few-shot header (RouterBench: 1.2-1.7k characters, 82% of
an ARC prompt), the raw prompts embed identically within the task and a semantic router sees
only the task. So the baselines embed what distinguishes a query:

1. the prompt (message contents joined by blank lines, :func:`prompt_text`);
2. with ``strip_shared_prefix``: minus its task's shared prefix, the longest common prefix of
   that task's **train** prompts (never val or test), cut back to a line end, used only
   when it is at least ``min_prefix_chars`` long over at least ``min_prefix_rows`` train rows,
   and removed from any row (any split) that starts with it and has text left after it;
3. with ``tail_chars``: the last ``tail_chars`` characters of what is left (the fallback for
   long prompts whose task has no long shared prefix).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from pydantic import Field

from shared.config import StrictConfig
from shared.errors import BadInput


class SemanticTextConfig(StrictConfig):
    """Which text of a query the semantic baselines (MiniLM kNN, MLP, MF) embed."""

    strip_shared_prefix: bool = Field(
        True, description="Remove each task's shared prefix (longest common prefix of its train prompts).")
    min_prefix_chars: int = Field(
        500, gt=0, description="Strip a task's shared prefix only when it is at least this many characters long "
        "(RouterBench headers: 1.2-1.7k; MMLU's one-line subject header stays).")
    min_prefix_rows: int = Field(
        10, ge=2, description="... and only for a task with at least this many train rows (one row's 'prefix' "
        "is the whole prompt).")
    tail_chars: int | None = Field(
        None, gt=0, description="Then keep only the last this-many characters (e.g. 1000, MiniLM's window); "
        "null: the whole remaining text.")


def prompt_text(messages: Sequence[dict[str, Any]]) -> str:
    """A query's prompt: its message contents joined by blank lines."""
    return "\n\n".join(m["content"] for m in messages)


def read_queries(queries_uri: str, query_ids: Sequence[str]) -> dict[str, list[str]]:
    """``{"text", "task", "source"}``: per query id (in order) its prompt (:func:`prompt_text`),
    ``task`` and ``source`` (empty strings when the table has no such column). Raises
    ``ValueError`` naming the ids the table lacks."""
    from shared import storage

    table = storage.read_parquet(queries_uri)
    cols = {c: table.column(c).to_pylist() if c in table.column_names else None
            for c in ("query_id", "messages", "task", "source")}
    index = {q: i for i, q in enumerate(cols["query_id"])}
    missing = [q for q in query_ids if q not in index]
    if missing:
        raise BadInput(f"{len(missing)} query ids are not in {queries_uri} (e.g. {missing[:3]})")
    rows = [index[q] for q in query_ids]
    def column(c: str) -> list[str]:
        return [""] * len(rows) if cols[c] is None else ["" if cols[c][i] is None else str(cols[c][i]) for i in rows]

    return {"text": [prompt_text(cols["messages"][i]) for i in rows], "task": column("task"),
            "source": column("source")}


def semantic_texts_for(queries_uri: str, query_ids: Sequence[str], fit: np.ndarray,
                       cfg: SemanticTextConfig | None = None) -> tuple[list[str], dict[str, Any]]:
    """:func:`semantic_texts` of query ids read from a query table, grouped by ``task``."""
    q = read_queries(queries_uri, query_ids)
    return semantic_texts(q["text"], q["task"], fit, cfg or SemanticTextConfig())


def shared_prefixes(texts: Sequence[str], groups: Sequence[str], fit: np.ndarray, min_chars: int,
                    min_rows: int) -> dict[str, str]:
    """``{group: prefix}`` for groups whose fit rows share a long prefix.

    ``texts``, ``groups``: ``(n,)``; ``fit``: ``(n,)`` bool, the rows the prefix is learned
    from (train only). Per group ``g`` with at least ``min_rows`` fit rows:
    ``p = os.path.commonprefix(fit texts of g)`` cut back to the end of its last whole line
    (after its last newline; with none, after its last whitespace), so a query's first line
    or word is never cut, kept when ``len(p) >= min_chars``.
    """
    texts, groups = np.asarray(texts, dtype=object), np.asarray(groups, dtype=object)
    fit = np.asarray(fit, dtype=bool)
    out = {}
    for g in sorted(set(groups[fit].tolist()), key=str):
        rows = texts[fit & (groups == g)].tolist()
        if len(rows) < min_rows:
            continue
        p = os.path.commonprefix(rows)
        line = p.rfind("\n")
        end = line if line >= 0 else max((i for i, ch in enumerate(p) if ch.isspace()), default=-1)
        p = p[: end + 1]
        if len(p) >= min_chars:
            out[str(g)] = p
    return out


def semantic_texts(texts: Sequence[str], groups: Sequence[str] | None, fit: np.ndarray,
                   cfg: SemanticTextConfig) -> tuple[list[str], dict[str, Any]]:
    """``(embedded texts (n,), info)``: each prompt as the semantic baselines embed it (see the
    module docstring). ``groups``: the task of each row (None: one group); ``fit``: ``(n,)``
    bool, the train rows the shared prefixes are learned from. ``info`` says what was done
    (settings, and per stripped task the prefix length and the rows it was removed from;
    never the text itself)."""
    texts = list(texts)
    groups = [""] * len(texts) if groups is None else [str(g) for g in groups]
    prefixes = (shared_prefixes(texts, groups, fit, cfg.min_prefix_chars, cfg.min_prefix_rows)
                if cfg.strip_shared_prefix and len(texts) else {})
    stripped, n_cut, out = dict.fromkeys(prefixes, 0), 0, []
    for text, g in zip(texts, groups):
        p = prefixes.get(g)
        if p and text.startswith(p) and text[len(p):].strip():
            text, stripped[g] = text[len(p):], stripped[g] + 1
        if cfg.tail_chars and len(text) > cfg.tail_chars:
            text, n_cut = text[-cfg.tail_chars:], n_cut + 1
        out.append(text)
    info = {**cfg.model_dump(mode="json"),
            "prefixes": {g: {"chars": len(p), "rows_stripped": stripped[g]} for g, p in prefixes.items()},
            "n_tail_cut": n_cut}
    return out, info


def describe(info: dict[str, Any] | None) -> str:
    """One sentence for the report: which text the semantic baselines embedded."""
    if not info:
        return "Semantic baselines: not evaluated."
    what = "the prompt (message contents joined by blank lines)"
    if info["prefixes"]:
        parts = ", ".join(f"{g or 'all rows'} {p['chars']} chars ({p['rows_stripped']} rows)"
                          for g, p in info["prefixes"].items())
        what += f" minus its task's shared prefix (longest common prefix of the task's train prompts): {parts}"
    elif info["strip_shared_prefix"]:
        what += (f" whole: no task's train prompts share a prefix of >= {info['min_prefix_chars']} characters "
                 f"(over >= {info['min_prefix_rows']} rows)")
    if info.get("tail_chars"):
        what += f"; then its last {info['tail_chars']} characters ({info['n_tail_cut']} texts cut)"
    return f"Semantic baselines embedded {what}."
