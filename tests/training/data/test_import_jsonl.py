"""The long format's JSONL reader splits records on ``\\n`` only: U+0085, U+2028 and U+2029
(which ``str.splitlines`` also breaks at) occur inside MMLU and CMMLU text."""

import json

import pyarrow.parquet as pq

from training.data.import_config import ImportConfig
from training.data.importer import run_import

ODD_BREAKS = "\u0085\u2028\u2029"


def test_jsonl_prompt_with_unicode_line_breaks_round_trips(tmp_path):
    prompts = [f"Which is right?{ODD_BREAKS}(A) one\u0085(B) two", f"Line\u2028separator and\u2029paragraph {ODD_BREAKS}"]
    rows = [{"prompt": p, "model": m, "correct": c, "cost": 0.01, "task": "mmlu"}
            for p in prompts for m, c in (("gpt-4-1106-preview", 1), ("mistralai/mistral-7b-chat", 0))]
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert all(ch in path.read_text(encoding="utf-8") for ch in ODD_BREAKS)  # raw characters, not \u escapes
    cfg = ImportConfig(inputs=[str(path)], output=str(tmp_path / "out" / "queries.parquet"),
                       labels=str(tmp_path / "out" / "labels"), format="long")
    result = run_import(cfg)
    table = pq.read_table(cfg.output).to_pylist()
    assert sorted(r["messages"][-1]["content"] for r in table) == sorted(prompts)
    assert not result["skipped"]
