"""`prefill-router data import format=routerdc`: RouterDC's JSON lists (question, soft scores per
model, the task from the file name) become a query table and label folders; bad rows and cells
are counted, never guessed."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shared.config import ConfigError, load_config
from training.data.import_config import ImportConfig
from training.data.source_models import ROUTERDC_MODELS
from training.data.importer import run_import
from training.data.import_sources import MissingColumn
from tests.procs import ROOT

SHARED = ROOT.parent / "shared" / "data" / "routerdc"
SOURCE = list(ROUTERDC_MODELS)[:3]                  # RouterDC column names
TARGETS = [ROUTERDC_MODELS[m] for m in SOURCE]      # their registry names


def row(question, *scores, **extra):
    return {"question": question, "scores": dict(zip(SOURCE, scores)), **extra}


def write(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return path


def run(tmp_path: Path, inputs, **kw):
    cfg = ImportConfig(format="routerdc", inputs=[str(p) for p in inputs], output=str(tmp_path / "o" / "q.parquet"),
                       labels=str(tmp_path / "o" / "labels"), **kw)
    return cfg, run_import(cfg)


def labels(cfg: ImportConfig, target: str) -> dict[str, dict]:
    from training.labels import read_target

    rows = read_target(f"{cfg.labels}/{target}", with_failed=False).to_pylist()
    return {r["query_id"]: r for r in rows if r["status"] == "ok"}


def test_soft_scores_tasks_from_file_names_and_bad_rows(tmp_path):
    mmlu = write(tmp_path / "mmlu_train.json", [
        row("Q1\nA. x\nB. y\nAnswer:", 0.37, 0.0, 0.912345678, cluster_id=4),
        row("Q2 ask", 1.0, 0.25),                                   # the third model has no score here
        row("Q3 bad", 1.5, 0.5, 0.5),                               # a score outside [0, 1]
        row("   ", 1.0, 1.0, 1.0),                                  # an empty question
        {"question": "Q4 no scores"},                               # no scores
        row("Q1\nA. x\nB. y\nAnswer:", 0.63, 1.0, 0.087654322),     # a repeated question
    ])
    gsm = write(tmp_path / "gsm8k-train.json", [row("Natalia sold clips\u2028to 48 friends\u0085.", 0.3, 0.9, 0.1)])
    cfg, report = run(tmp_path, [mmlu, gsm])
    table = pq.read_table(cfg.output).to_pylist()
    assert [(r["task"], r["source"]) for r in table] == [("mmlu", "routerdc")] * 3 + [("gsm8k", "routerdc")]
    assert table[3]["messages"][0]["content"] == "Natalia sold clips\u2028to 48 friends\u0085."
    assert report["rows_read"] == 7 and report["rows"] == 4
    assert set(report["skipped"]) == {"routerdc: empty question", "routerdc: no scores"}
    assert report["merged"]["duplicate prompts merged"] == 1
    effect = report["merge_effect"]["mmlu"]
    assert (effect["rows"], effect["queries"], effect["merged_rows"]) == (4, 3, 1)
    # the first model: 2/3 over its 3 labelled rows, 3/4 over its 2 queries (Q1's rows averaged); the others move less
    assert effect["target"] == TARGETS[0] and effect["largest_mean_shift"] == pytest.approx(3 / 4 - 2 / 3)

    q1, q2, q3, g = (r["query_id"] for r in table)
    first, third = labels(cfg, TARGETS[0]), labels(cfg, TARGETS[2])
    assert first[q1]["correct"] == pytest.approx(0.5) and first[g]["correct"] == pytest.approx(0.3)  # floats kept
    assert labels(cfg, TARGETS[1])[q2]["correct"] == 0.25
    assert third[q1]["correct"] == pytest.approx((0.912345678 + 0.087654322) / 2)
    assert q2 not in third and q3 not in first                     # missing and bad cells: no ok row, not a 0
    assert set(third) == {q1, q3, g}
    cells = report["cells"][TARGETS[0]]
    assert any(k.startswith("bad correctness cells") for k in cells) and cells["labelled cells"] == 4
    assert report["cells"][TARGETS[2]]["empty correctness cells"] == 1


def test_folder_input_task_map_and_errors(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder / "arc_challenge_test.json", [row("Which gas?", 0.5, 0.75, 1.0)])
    write(folder / "preAlgebra.json", [row("2 + 2 =", 0.0, 0.1, 0.2)])
    (folder / "notes.csv").write_text("question\n")
    cfg, report = run(tmp_path, [folder], tasks={"preAlgebra": "prealgebra-ood"})
    assert [r["task"] for r in pq.read_table(cfg.output).to_pylist()] == ["arc_challenge", "prealgebra-ood"]
    assert report["cells"].keys() == set(TARGETS)

    write(tmp_path / "bad.json", [{"prompt": "x", "scores": {}}])
    with pytest.raises(MissingColumn, match="missing required column 'question'"):
        run(tmp_path, [tmp_path / "bad.json"])
    (tmp_path / "lines.json").write_text('{"question": "a"}\n{"question": "b"}\n')
    with pytest.raises(ValueError, match="not a JSON file"):
        run(tmp_path, [tmp_path / "lines.json"])
    write(tmp_path / "unknown.json", [{"question": "x", "scores": {"someone/else-7b": 1.0}}])
    with pytest.raises(ValueError, match="'someone/else-7b'.*not in the registry.*model_names"):
        run(tmp_path, [tmp_path / "unknown.json"])
    with pytest.raises(ConfigError, match="unknown format"):
        load_config(ImportConfig, None, [f"inputs=[{folder}]", "format=router-dc"])


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/routerdc is absent")
def test_shared_files_import_whole(tmp_path):
    """The published training files: 5 tasks, 5,935 queries, 7 targets, every cell labelled."""
    cfg, report = run(tmp_path, [SHARED])
    assert report["rows_read"] == report["rows"] == 5935 and not report["skipped"]
    assert {t for t in report["splits"]} == {f"routerdc/{t}" for t in
                                             ("arc_challenge", "cmmlu", "gsm8k", "humaneval", "mmlu")}
    assert set(report["cells"]) == set(ROUTERDC_MODELS.values())
    for cells in report["cells"].values():
        assert cells["labelled cells"] == 5935 and not [k for k in cells if "bad" in k or "empty" in k], cells
    gsm = labels(cfg, "metamath-mistral-7b")
    assert {round(r["correct"], 1) for r in gsm.values()} > {0.0, 0.5, 1.0}   # soft scores, not 0/1
