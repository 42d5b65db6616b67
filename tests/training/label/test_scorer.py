"""The labelling Scorer on any backend of the registry's contract (fake backends: no model, no network)."""

from __future__ import annotations

from shared.backends import Completion, OptionScores
from shared.registry import ModelSpec
from training.label.backends import ScoringOptions, Scorer

SPEC = ModelSpec(name="fake", role="target", source="hf", hf_id="x")


def mc(reference, content="q", options=None):
    meta = {"options": options} if options else {}
    return {"messages": [{"role": "user", "content": content}], "answer_type": "multiple_choice",
            "reference": reference, "choices": ["A", "B"], "meta": meta}


def exact(reference, content="q"):
    return {"messages": [{"role": "user", "content": content}], "answer_type": "exact", "reference": reference,
            "choices": [], "meta": {}}


class Likelihoods:
    """Reads log-probabilities: picks B for every question; answers texts from a table."""

    spec = SPEC

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def option_scores(self, rows, mode):
        self.asked.append((mode, [r["options"] for r in rows]))
        return [OptionScores({"A": -2.0, "B": -1.0}, 11) for _ in rows]

    def complete(self, chats, max_tokens):
        self.asked.append(("complete", max_tokens))
        return [self.answers[m[-1]["content"]] for m in chats]


class TextOnly(Likelihoods):
    def option_scores(self, rows, mode):
        return None


def test_options_by_likelihood_and_texts_scored_in_row_order():
    backend = Likelihoods({"capital?": Completion("Paris", 5, 2),
                           "down": Completion(None, None, None, 0.5, "HTTP 503")})
    rows = [exact("Paris", "capital?"), mc("B", options=["one", "two"]), exact("x", "down"), mc("A")]
    got = Scorer(backend, ScoringOptions(max_new_tokens=9)).label(rows)
    assert [r["status"] for r in got] == ["ok", "ok", "failed", "ok"]
    assert [r["correct"] for r in got] == [1.0, 1.0, None, 0.0]
    assert got[1]["answer"] == "B" and (got[1]["input_tokens"], got[1]["output_tokens"]) == (11, 1)
    assert got[0]["answer"] == "Paris" and (got[0]["input_tokens"], got[0]["output_tokens"]) == (5, 2)
    assert got[2]["error"] == "HTTP 503" and got[2]["latency_s"] == 0.5
    assert backend.asked == [("complete", 9), ("option_text", [["one", "two"], None])]


def test_a_text_only_backend_answers_multiple_choice_by_generation():
    backend = TextOnly({"q": Completion("The answer is (B).", 8, 4, latency_s=0.25)})
    got = Scorer(backend, ScoringOptions(max_new_tokens=7, mc_scoring="letter")).label([mc("B"), mc("A")])
    assert [r["correct"] for r in got] == [1.0, 0.0] and got[0]["answer"] == "The answer is (B)."
    assert got[0]["latency_s"] == 0.25 and backend.asked == [("complete", 7)]


def test_a_failing_group_becomes_failed_rows_and_the_others_are_answered():
    class Broken(Likelihoods):
        def option_scores(self, rows, mode):
            raise RuntimeError("CUDA out of memory")

    got = Scorer(Broken({"q": Completion("x", 1, 1)})).label([mc("A"), exact("x"), mc("B")])
    assert [r["status"] for r in got] == ["failed", "ok", "failed"]
    assert got[0]["error"] == "RuntimeError: CUDA out of memory" and got[0]["correct"] is None
    assert got[1]["correct"] == 1.0
