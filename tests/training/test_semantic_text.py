"""The text the semantic baselines (and tune's MiniLM block) embed: a task's shared few-shot
header, learned on train rows, stripped; an optional tail cut."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tests.training.evaluate.test_evaluate import tiny

def test_semantic_text_strips_the_train_prefix_and_cuts_the_tail():
    from training.semantic_text import SemanticTextConfig, describe, semantic_texts

    header = "Solve the task below as in the examples.\n" * 15 + "\n"      # 616 chars, ends in whitespace
    other = "Another long header that only test rows share.\n" * 15       # 720 chars
    texts = ([header + f"Q{i} what is {i} + {i}?" for i in range(10)]      # a: 10 train rows ("Q" not cut)
             + [header + "Q77 a test question", "unrelated test prompt", header]  # a: test rows
             + [header + f"Q{i} b" for i in range(3)]                      # b: 3 train rows only
             + [other + "x1", other + "x2"])                               # c: test rows only
    groups = ["a"] * 13 + ["b"] * 3 + ["c"] * 2
    fit = np.array([True] * 10 + [False] * 3 + [True] * 3 + [False] * 2)
    out, info = semantic_texts(texts, groups, fit, SemanticTextConfig())
    assert out[:10] == [f"Q{i} what is {i} + {i}?" for i in range(10)]
    assert out[10] == "Q77 a test question"                  # the train prefix applies to test rows too
    assert out[11] == texts[11] and out[12] == header         # not starting with it / nothing left: kept
    assert out[13:] == texts[13:]                             # b: too few train rows; c: no train rows
    assert info["prefixes"] == {"a": {"chars": len(header), "rows_stripped": 11}}
    assert "a 616 chars (11 rows)" in describe(info)
    # cut back to a line end: the queries' common "What is" stays; without a newline, to a word end
    same = [header + f"What is {i}?" for i in range(10)]
    assert semantic_texts(same, None, np.ones(10, bool), SemanticTextConfig())[0][0] == "What is 0?"
    one_line = [header.replace("\n", " ") + f"What is {i}?" for i in range(10)]
    assert semantic_texts(one_line, None, np.ones(10, bool), SemanticTextConfig())[0][0] == "0?"
    # the prefix must be long enough to matter: MMLU-style one-line headers stay
    assert semantic_texts(texts, groups, fit, SemanticTextConfig(min_prefix_chars=700))[0] == texts
    # tail fallback: the last tail_chars characters of what is left (no stripping needed)
    tail, info = semantic_texts(texts, groups, fit, SemanticTextConfig(strip_shared_prefix=False, tail_chars=12))
    assert tail[0] == texts[0][-12:] and info["n_tail_cut"] == len(texts) and "last 12 characters" in describe(info)
    both, _ = semantic_texts(texts, groups, fit, SemanticTextConfig(tail_chars=12))
    assert both[10] == "Q77 a test question"[-12:] and both[0] == "Q0 what is 0 + 0?"[-12:]


def test_tune_embeds_the_same_text_as_the_semantic_baselines(tmp_path, monkeypatch):
    import pyarrow as pa

    import training.embedder as B
    from shared import storage
    from training.semantic_text import SemanticTextConfig, semantic_texts
    from training.fit.tune import minilm_block

    header = "Example: 2 + 2 = 4.\n" * 30                      # 600 chars
    prompts = [header + f"What is {i} + {i}?" for i in range(12)]
    ids, split = [f"q{i}" for i in range(12)], ["train"] * 10 + ["val"] * 2
    storage.write_parquet(pa.table({"query_id": ids, "messages": [[{"role": "user", "content": p}] for p in prompts],
                                    "task": ["add"] * 12, "source": ["s"] * 12}), str(tmp_path / "q.parquet"))
    seen = []

    class Fake:
        def __init__(self, *a, **k):
            pass

        def __call__(self, texts):
            seen.extend(texts)
            return np.zeros((len(texts), 4), np.float32)

    monkeypatch.setattr(B, "MiniLMEmbedder", Fake)
    data = replace(tiny(np.zeros((12, 2)), split), query_ids=np.array(ids))
    assert minilm_block(data, str(tmp_path / "q.parquet")).shape == (12, 4)
    expected, _ = semantic_texts(prompts, ["add"] * 12, np.array(split) == "train", SemanticTextConfig())
    assert seen == expected == [f"What is {i} + {i}?" for i in range(12)]


def test_minilm_loaded_in_a_pipe_draws_no_bar(capfd):
    """The real MiniLM: unit vectors, and no "Loading weights" bar in a log (stderr is a pipe here)."""
    from training.embedder import MiniLMEmbedder

    vecs = MiniLMEmbedder()(["What is 7 + 5?", "Name a prime number."])
    assert vecs.shape == (2, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert "Loading weights" not in capfd.readouterr().err
