"""`prefill-router data import`: RouterBench (CSV, pickle) and long-format (Parquet, CSV, JSONL)
inputs become a query table and label folders that the project's own readers load."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from shared.registry import load_registry
from training.queries import QUERY_SCHEMA
from training.data.import_config import ImportConfig
from training.data.source_models import ROUTERBENCH_MODELS
from training.data.importer import run_import
from training.data.import_sources import MissingColumn
from tests.procs import ROOT

SHARED = ROOT.parent / "shared" / "data" / "routerbench"
MODELS = ["gpt-4-1106-preview", "mistralai/mistral-7b-chat"]      # RouterBench column names
TARGETS = ["gpt-4-1106-preview", "mistral-7b-chat"]                # their registry names


def rb_frame(n: int = 10) -> pd.DataFrame:
    """A RouterBench-shaped frame: Python-literal list prompts, 0/1 correctness, USD costs."""
    rows = []
    for i in range(n):
        row = {"Unnamed: 0": i, "sample_id": f"task.{i}", "prompt": repr([f"Question {i}: what is {i} + 1?"]),
               "eval_name": "mbpp" if i % 3 == 0 else "arc-challenge"}
        for j, m in enumerate(MODELS):
            row[m] = float((i + j) % 2)
            row[f"{m}|model_response"] = repr([f"It is {i + 1}."])
            row[f"{m}|total_cost"] = 1e-4 * (j + 1) * (i + 1)
        row["oracle_model_to_route_to"] = MODELS[1]
        rows.append(row)
    return pd.DataFrame(rows)


def config(tmp_path: Path, inputs, name: str = "out", **kw) -> ImportConfig:
    kw.setdefault("targets", MODELS)
    return ImportConfig(inputs=[str(p) for p in inputs], output=str(tmp_path / name / "queries.parquet"),
                        labels=str(tmp_path / name / "labels"), **kw)


def labels_of(cfg: ImportConfig, target: str) -> pd.DataFrame:
    """A target's label rows from its shards (what `label run` leaves behind), indexed by query id."""
    from training.labels import read_target

    return read_target(f"{cfg.labels}/{target}", with_failed=False).to_pandas().set_index("query_id")


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def test_routerbench_csv_writes_query_table_and_label_folders(tmp_path):
    cfg = config(tmp_path, [write_csv(rb_frame(), tmp_path / "rb.csv")])
    result = run_import(cfg)
    table = pq.read_table(cfg.output)
    assert table.schema.equals(QUERY_SCHEMA) and table.num_rows == 10
    rows = table.to_pylist()
    assert {r["source"] for r in rows} == {"routerbench"}
    assert {r["task"] for r in rows} == {"mbpp", "arc-challenge"}
    assert {r["answer_type"] for r in rows if r["task"] == "mbpp"} == {"code"}
    assert rows[1]["messages"] == [{"role": "user", "content": "Question 1: what is 1 + 1?"}]
    assert json.loads(rows[1]["meta"]) == {"source_ids": ["task.1"]}
    assert set(table.column("split").to_pylist()) <= {"train", "val", "test"}
    assert "oracle" not in json.dumps(rows)                        # never a feature
    for target in TARGETS:
        tdir = Path(cfg.labels) / target
        assert sorted(p.name for p in tdir.iterdir()) == ["manifest.json", "shard-00000.parquet"]
        manifest = json.loads((tdir / "manifest.json").read_text())
        assert manifest["identity"]["queries_hash"] == result["table_hash"]
        assert manifest["summary"]["ok"] == 10 and manifest["summary"]["accuracy"] == pytest.approx(0.5)
    mistral = labels_of(cfg, "mistral-7b-chat")
    first = mistral.loc[rows[0]["query_id"]]
    assert (first["correct"], first["cost"], first["status"], first["answer"]) == (1.0, 2e-4, "ok", "It is 1.")
    assert first["input_tokens"] == math.ceil(len("Question 0: what is 0 + 1?") / 4) and first["output_tokens"] == 2
    report = json.loads(Path(cfg.output.replace(".parquet", ".report.json")).read_text())
    assert report["rows"] == 10 and report["splits"] and report["skipped"] == {}
    summary = json.loads((Path(cfg.labels) / "summary.json").read_text())
    assert set(summary["targets"]) == set(TARGETS) and summary["query_rows"] == 10


def test_missing_column_is_named_with_the_columns_found(tmp_path):
    path = write_csv(rb_frame().drop(columns=["mistralai/mistral-7b-chat|total_cost"]), tmp_path / "rb.csv")
    with pytest.raises(MissingColumn, match=r"'mistralai/mistral-7b-chat\|total_cost'.*columns found: \[.*eval_name"):
        run_import(config(tmp_path, [path]))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "p", "model": "gpt-4-1106-preview", "correct": 1}) + "\n")
    with pytest.raises(MissingColumn, match=r"'cost'.*columns found: \['prompt', 'model', 'correct'\]"):
        run_import(config(tmp_path, [long], format="long", targets=None))


def test_empty_cells_are_missing_labels_not_wrong_answers(tmp_path):
    from training.dataset import load_labels
    from training.labels import read_target

    frame = rb_frame()
    frame.loc[2, "gpt-4-1106-preview"] = np.nan        # an empty cell in the CSV
    frame.loc[4, "mistralai/mistral-7b-chat"] = 7.0    # not a correctness: kept as missing, reported
    cfg = config(tmp_path, [write_csv(frame, tmp_path / "rb.csv")])
    result = run_import(cfg)
    ids = np.asarray(pq.read_table(cfg.output).column("query_id").to_pylist())
    gpt4 = labels_of(cfg, "gpt-4-1106-preview").loc[ids[2]]
    assert gpt4["status"] == "missing" and pd.isna(gpt4["correct"]) and gpt4["error"].startswith("empty")
    loaded = load_labels(cfg.labels, TARGETS, ids)                  # the real loader: NaN, masked
    assert math.isnan(loaded["Y"][2, 0]) and math.isnan(loaded["Y"][4, 1]) and math.isnan(loaded["cost"][2, 0])
    assert np.isnan(loaded["Y"]).sum() == 2
    assert loaded["Y"][3, 0] == 1.0 and loaded["cost"][3, 0] == pytest.approx(4e-4)
    latency = read_target(f"{cfg.labels}/gpt-4-1106-preview", with_failed=False).column("latency_s")
    assert latency.null_count == len(latency) == len(ids)                # not recorded: null, not NaN
    cells = result["cells"]
    assert cells["gpt-4-1106-preview"]["empty correctness cells"] == 1
    assert any("7.0 is not in [0, 1.0]" in k for k in cells["mistral-7b-chat"])
    stats = result["summary"]["targets"]["gpt-4-1106-preview"]
    assert (stats["ok"], stats["missing"], stats["failed"]) == (9, 1, 0)
    assert stats["accuracy"] == pytest.approx(5 / 9)              # the empty cell is not counted as wrong


def test_duplicate_prompts_are_merged_and_counted(tmp_path):
    frame = rb_frame()
    dup = frame.iloc[[1]].copy()
    dup["sample_id"] = "task.1-again"
    dup["gpt-4-1106-preview"] = 1.0 - dup["gpt-4-1106-preview"]   # the copies disagree: averaged
    cfg = config(tmp_path, [write_csv(pd.concat([frame, dup]), tmp_path / "rb.csv")])
    result = run_import(cfg)
    table = pq.read_table(cfg.output).to_pylist()
    assert len(table) == 10 and result["rows_read"] == 11
    assert result["merged"]["duplicate prompts merged"] == 1
    assert json.loads(table[1]["meta"]) == {"source_ids": ["task.1", "task.1-again"]}
    assert labels_of(cfg, "gpt-4-1106-preview").loc[table[1]["query_id"], "correct"] == 0.5
    assert labels_of(cfg, "mistral-7b-chat").loc[table[1]["query_id"], "correct"] == 0.0   # copies agree
    assert result["cells"]["gpt-4-1106-preview"]["conflicting duplicate labels (averaged)"] == 1


def test_unparsable_prompt_is_skipped_with_its_reason(tmp_path):
    frame = rb_frame()
    frame.loc[5, "prompt"] = "['an unterminated literal"
    frame.loc[6, "prompt"] = "a plain string prompt"          # plain strings are fine
    frame.loc[7, "prompt"] = ""
    cfg = config(tmp_path, [write_csv(frame, tmp_path / "rb.csv")])
    result = run_import(cfg)
    contents = [r["messages"][0]["content"] for r in pq.read_table(cfg.output).to_pylist()]
    assert len(contents) == 8 and "a plain string prompt" in contents
    assert result["skipped"] == {"routerbench: prompt is not a valid Python-literal list (SyntaxError)": 1,
                                 "routerbench: empty prompt": 1}
    assert any("rb.csv: row 5" in e and "unterminated" in e for e in result["examples"])


def test_pickle_needs_the_trust_flag_and_matches_the_csv(tmp_path):
    frame = rb_frame()
    frame.loc[2, "gpt-4-1106-preview"] = np.nan
    csv = write_csv(frame, tmp_path / "rb.csv")
    pickled = frame.copy()
    pickled["prompt"] = [[f"Question {i}: what is {i} + 1?"] for i in range(len(frame))]  # list objects
    pkl = tmp_path / "routerbench_0shot.pkl"
    pickled.to_pickle(pkl)
    with pytest.raises(ValueError, match="unpickling runs code.*trust_pickle=true"):
        run_import(config(tmp_path, [pkl], name="refused"))
    assert not (tmp_path / "refused").exists()
    a, b = config(tmp_path, [csv], name="csv"), config(tmp_path, [pkl], name="pkl", trust_pickle=True)
    run_import(a)
    run_import(b)
    assert pq.read_table(a.output).equals(pq.read_table(b.output))
    for target in TARGETS:
        assert labels_of(a, target).equals(labels_of(b, target))


def test_a_folder_reads_every_file_and_a_changed_input_is_refused(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    frame = rb_frame(12)
    write_csv(frame.iloc[:6], folder / "a.csv")
    write_csv(frame.iloc[6:], folder / "b.csv")
    (folder / "README.md").write_text("not data")
    cfg = config(tmp_path, [folder])
    first = run_import(cfg)
    shard = Path(cfg.labels) / "mistral-7b-chat" / "shard-00000.parquet"
    before = shard.read_bytes()
    assert [Path(s["path"]).name for s in first["sources"]] == ["a.csv", "b.csv"] and first["rows"] == 12
    assert run_import(cfg)["table_hash"] == first["table_hash"] and shard.read_bytes() == before  # idempotent
    write_csv(frame.iloc[6:10], folder / "b.csv")
    with pytest.raises(ValueError, match="different settings"):
        run_import(cfg)


def test_long_format_with_cost_or_tokens(tmp_path):
    spec = load_registry().get("gpt-4-1106-preview")
    rows = [{"prompt": "p1", "model": "gpt-4-1106-preview", "correct": 1, "cost": 0.01, "task": "t1"},
            {"prompt": "p1", "model": "mistralai/mistral-7b-chat", "correct": 0, "cost": 0.001, "task": "t1"},
            {"prompt": "p2", "model": "gpt-4-1106-preview", "correct": 0, "cost": 0.02, "task": None},
            {"prompt": "p2", "model": "gpt-4-1106-preview", "correct": 1, "cost": 0.04, "task": None}]
    pd.DataFrame(rows).to_parquet(tmp_path / "long.parquet")
    cfg = config(tmp_path, [tmp_path / "long.parquet"], format="long", targets=None)
    result = run_import(cfg)
    table = pq.read_table(cfg.output).to_pylist()
    assert [(r["source"], r["task"]) for r in table] == [("import", "t1"), ("import", "general")]
    mistral, gpt4 = labels_of(cfg, "mistral-7b-chat"), labels_of(cfg, "gpt-4-1106-preview")
    assert mistral.loc[table[1]["query_id"], "status"] == "missing"            # no row: missing, not wrong
    assert gpt4.loc[table[1]["query_id"], "correct"] == 0.5
    assert gpt4.loc[table[1]["query_id"], "cost"] == pytest.approx(0.03)
    assert result["merged"] == {"duplicate labels of gpt-4-1106-preview": 1}
    jsonl = tmp_path / "long.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"messages": messages, "model": "gpt-4-1106-preview", "correct": True, "input_tokens": 100,
         "output_tokens": 10},
        {"messages": [], "model": "gpt-4-1106-preview", "correct": 1, "input_tokens": 1, "output_tokens": 1}]))
    cfg = config(tmp_path, [jsonl], name="tokens", format="long", targets=None)
    result = run_import(cfg)
    (row,) = pq.read_table(cfg.output).to_pylist()
    assert row["messages"] == messages
    label = labels_of(cfg, "gpt-4-1106-preview").loc[row["query_id"]]
    assert (label["input_tokens"], label["output_tokens"]) == (100, 10)
    assert label["cost"] == pytest.approx(spec.cost(100, 10)) == pytest.approx((100 * 10 + 10 * 30) / 1e6)
    assert result["skipped"] == {"import: messages is not a non-empty list of {role, content}": 1}
    csv = tmp_path / "long.csv"
    pd.DataFrame([{"messages": json.dumps(messages), "model": "no-such-model", "correct": 1, "cost": 1}]).to_csv(csv)
    with pytest.raises(ValueError, match="'no-such-model'.*not in the registry.*model_names"):
        run_import(config(tmp_path, [csv], name="unknown", format="long", targets=None))


def test_evaluation_scores_with_the_imported_cost(tmp_path):
    """evaluate's outcome cost is the label ``cost`` column; a missing cell falls back to the price model."""
    from training.dataset import RoutingData, load_labels

    try:
        from training.evaluate.scoring import outcome_costs      # evaluate's scoring, after its split
    except ImportError:
        from training.evaluate.run import outcome_costs

    frame = rb_frame()
    frame.loc[2, "gpt-4-1106-preview"] = np.nan
    cfg = config(tmp_path, [write_csv(frame, tmp_path / "rb.csv")])
    run_import(cfg)
    ids = np.asarray(pq.read_table(cfg.output).column("query_id").to_pylist())
    lab = load_labels(cfg.labels, TARGETS, ids)
    data = RoutingData(query_ids=ids, split=np.full(len(ids), "test"), blocks={}, targets=TARGETS, Y=lab["Y"],
                       cost=lab["cost"], input_tokens=lab["input_tokens"], output_tokens=lab["output_tokens"])
    decided = np.full(lab["cost"].shape, 9.0)
    costs = outcome_costs(data, decided)
    expected = np.c_[frame["gpt-4-1106-preview|total_cost"], frame["mistralai/mistral-7b-chat|total_cost"]]
    assert costs[2, 0] == 9.0
    keep = np.ones_like(costs, bool)
    keep[2, 0] = False
    np.testing.assert_allclose(costs[keep], expected[keep])


def test_routerbench_targets_are_opt_in_priced_and_never_fetched(registry):
    from shared.models import missing_weights

    assert set(ImportConfig(inputs=["x"]).names) == set(ROUTERBENCH_MODELS) and len(ROUTERBENCH_MODELS) == 11
    default = {m.name for m in registry.targets()}
    for name in ROUTERBENCH_MODELS.values():
        spec = registry.get(name)
        assert spec.opt_in and spec.backend == "openai" and name not in default
        assert spec.price_input_per_m > 0 and spec.price_output_per_m >= spec.price_input_per_m
        assert missing_weights(spec) is None                    # nothing to download or convert
    assert registry.get("gpt-4-1106-preview").cost(1e6, 1e6) == 40.0


def test_cli_import_and_its_one_line_errors(tmp_path, capsys):
    from training.data.build import main

    csv = write_csv(rb_frame(), tmp_path / "rb.csv")
    out = tmp_path / "cli"
    code = main(["import", "-c", str(ROOT / "configs" / "import-routerbench.yaml"), f"inputs=[{csv}]",
                 f"output={out}/queries.parquet", f"labels={out}/labels", f"targets={json.dumps(MODELS)}"])
    printed = capsys.readouterr().out
    assert code == 0 and (out / "labels" / "mistral-7b-chat" / "manifest.json").is_file()
    assert "mistral-7b-chat" in printed and "duplicates merged" in printed
    assert main(["import", f"inputs=[{tmp_path / 'nope.csv'}]"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared RouterBench files not present")
def test_real_routerbench_rows(tmp_path, registry):
    cfg = ImportConfig(inputs=[str(SHARED)], output=str(tmp_path / "q.parquet"), labels=str(tmp_path / "labels"),
                       limit=10)
    result = run_import(cfg)
    table = pq.read_table(cfg.output).to_pylist()
    assert len(table) == 30 and {r["task"] for r in table} == {"arc-challenge", "winogrande", "mbpp"}
    targets = sorted(p.name for p in Path(cfg.labels).iterdir() if p.is_dir())
    assert targets == sorted(ROUTERBENCH_MODELS.values())
    manifest = json.loads((Path(cfg.labels) / "import-manifest.json").read_text())
    for source in manifest["files"]:
        assert source["sha256"] == hashlib.sha256(Path(source["path"]).read_bytes()).hexdigest()
        assert source["rows_read"] == 10
    assert {Path(s["path"]).name for s in manifest["files"]} == {
        "arc_challenge_train.csv", "mbpp_train.csv", "winograde_train.csv"}
    for target in targets:
        labels = labels_of(cfg, target)
        ok = labels[labels["status"] == "ok"]
        assert len(labels) == 30 and len(ok) >= 25 and set(ok["correct"]) <= {0.0, 1.0}
        assert (ok["cost"] > 0).all() and (ok["input_tokens"] > 0).all()
        spec = registry.get(target)      # the registry's prices reproduce the benchmark's costs
        priced = sum(spec.cost(i, o) for i, o in zip(ok["input_tokens"], ok["output_tokens"]))
        assert priced == pytest.approx(ok["cost"].sum(), rel=0.1)
    assert result["summary"]["targets"]["gpt-4-1106-preview"]["accuracy"] > 0.5


def test_label_run_refuses_an_imported_table(tmp_path):
    """An imported table has no reference answers: labelling it would score every answer wrong."""
    from training.label.run import LabelConfig, run_label

    cfg = config(tmp_path, [write_csv(rb_frame(), tmp_path / "rb.csv")])
    run_import(cfg)
    with pytest.raises(ValueError, match="10 of 10 queries .* have no reference answer"):
        run_label(LabelConfig(queries=cfg.output, out=str(tmp_path / "relabel"), targets=["smollm2-135m"]))
    assert not (tmp_path / "relabel").exists(), "refused before anything is written"


def test_inputs_on_s3_are_read_like_local_files(tmp_path, moto_s3):
    """A retraining job on a cluster reads its RouterBench files from S3 (a loopback moto server)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="bench")
    local = write_csv(rb_frame(), tmp_path / "rb.csv")
    s3.put_object(Bucket="bench", Key="routerbench/rb.csv", Body=local.read_bytes())
    s3.put_object(Bucket="bench", Key="routerbench/README.md", Body=b"not an input")
    remote = run_import(config(tmp_path, ["s3://bench/routerbench"], name="s3"))
    plain = run_import(config(tmp_path, [local], name="local"))
    assert remote["table_hash"] == plain["table_hash"] and remote["rows"] == 10
    assert [s["path"] for s in remote["sources"]] == ["s3://bench/routerbench/rb.csv"]
    assert remote["sources"][0]["sha256"] == plain["sources"][0]["sha256"]
    with pytest.raises(FileNotFoundError, match="no such object or prefix"):
        run_import(config(tmp_path, ["s3://bench/nothing-here"], name="none"))


def test_a_format_is_one_registered_class(tmp_path):
    """A new ImportFormat subclass is a `format` the config accepts and `data import` reads
    (here: a JSON array of long rows); an unknown format is a config error naming the known ones."""
    from shared.config import ConfigError, load_config
    from training.data.import_formats import FORMATS, ImportFormat, Long

    with pytest.raises(ConfigError, match="unknown format 'jsonarray'; known: routerbench, long, routerdc"):
        load_config(ImportConfig, None, [f"inputs=[{tmp_path}]", "format=jsonarray"])

    class JsonArray(ImportFormat):
        name, extensions, source, model_names = "jsonarray", (".json",), "import", Long.model_names

        @classmethod
        def records(cls, path, cfg):
            rows = json.loads(path.read_text())
            return list(rows[0]), rows

        read = Long.read

    try:
        rows = [{"prompt": "p1", "model": "gpt-4-1106-preview", "correct": 1, "cost": 0.01, "task": "t1"},
                {"prompt": "p1", "model": "mistralai/mistral-7b-chat", "correct": 0, "cost": 0.001, "task": "t1"}]
        (tmp_path / "rows.json").write_text(json.dumps(rows))
        (tmp_path / "ignored.csv").write_text("prompt\n")
        cfg = config(tmp_path, [tmp_path], format="jsonarray", targets=None)  # a folder: only its .json files
        result = run_import(cfg)
        assert [s["path"] for s in result["sources"]] == [str(tmp_path / "rows.json")]
        assert labels_of(cfg, "mistral-7b-chat")["correct"].tolist() == [0.0]
        with pytest.raises(TypeError, match="two import formats are named 'jsonarray'"):
            type("Again", (ImportFormat,), {"name": "jsonarray"})
    finally:
        del FORMATS["jsonarray"]
