"""Learning from traffic, replayed: a router that starts from 10% of the labels retrains on its own log.

    .venv/bin/python bench/learning_loop.py --replay 800 --every 200 --epsilon 0 0.2
    .venv/bin/python bench/learning_loop.py --benchmark routerdc --replay 1600 --every 400 --epsilon 0 0.2

For real, on a private local Ray head (``cluster.local``), through HTTP, Serve and Ray jobs:

1. The benchmark is imported as its shipped pipeline imports it (RouterBench: 2,225 queries, 11
   targets; RouterDC: 5,935 queries, 7 targets priced alike, soft scores; split 0.7/0.1/0.2, seed 0),
   and every prompt is captured once into a *bank* (:func:`bank_capture`) that every retraining
   reuses (``capture.reuse``): a retraining encodes nothing.
2. The train and val rows, shuffled (``--seed``), are the traffic: the first ``--seed-share`` are
   labelled in full (a log of their own: every target observed, the benchmark's label as feedback),
   the next ``--replay`` are replayed. The test rows are the held-out part, never logged.
3. Per epsilon: the first router is fitted on the seed log, then served as a decision service
   (``targets: []``) with a decision log and ``exploration.epsilon``. Each replayed query is a
   ``POST /v1/route``; its feedback the benchmark's label of the named target. Every ``--every``
   requests ``configs/pipeline-from-logs.yaml`` runs as a Ray job (``prefill-router submit run``) on
   the seed and traffic logs: import, capture (from the bank), fit, evaluate off-policy on held
   logged rows, publish if the gate passes (``dr_accuracy``), and reload the running app in place.
4. After each retraining, the published router is scored on the held-out rows with their full
   labels: accuracy and mean cost at its operating point (RouterDC: the task-averaged accuracy, the
   soft score of the named model as feedback); beside it the shipped ``data/<benchmark>/router``
   (trained on every train label: the ceiling) and the best single model, on the same rows.

Writes ``--json`` and a PNG (``--plot``), and prints a Markdown table (bench/README.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# per benchmark: the import (a config file, and the section of it that is the ImportConfig), the shipped
# router (the ceiling: its encoder is every retraining's), the frozen blocks every retraining fits (the shipped
# router's when the curves in bench/README.md were measured), fit overrides, and its name on plots
BENCHMARKS = {
    "routerbench": {"import": ("configs/import-routerbench.yaml", None), "ceiling": "data/routerbench/router",
                    "blocks": ["h18_last", "h21_last"], "fit": [], "title": "RouterBench", "headline": "accuracy"},
    "routerdc": {"import": ("configs/pipeline-routerdc.yaml", "data_import"), "ceiling": "data/routerdc/router",
                 "blocks": ["h12_last", "h12_mean"],
                 "fit": ["fit.tolerance=0.0"], "title": "RouterDC",  # priced alike: argmax, as its shipped router
                 "headline": "task_averaged_accuracy"},  # RouterDC's metric
}
FIELDS = ("epsilon", "logged", "published", "accuracy", "cost", "explored_share", "candidate_accuracy",
          "candidate_cost")
# what the table (bench/README.md) reads of the JSON
TABLE_FIELDS = {"points": FIELDS, "ceiling": ("accuracy", "cost", "n", "best_single.name", "best_single.accuracy",
                                              "best_single.cost")}


def bank_capture(benchmark: str) -> list[str]:
    """Capture overrides of the bank: the ceiling's encoder, the layers and poolings of the retrainings' blocks
    and of the ceiling's, and the token states the ceiling reads (attention pooling, an adapter), if any."""
    from shared.artifact import read_meta
    from shared.features import parse_block
    from training.token_states import token_capture

    meta = read_meta(str(ROOT / BENCHMARKS[benchmark]["ceiling"]))
    blocks = [parse_block(b) for b in BENCHMARKS[benchmark]["blocks"]]
    wanted = {"layers": sorted({b[0] for b in blocks} | set(meta.layers)),
              "poolings": sorted({b[1] for b in blocks} | set(meta.poolings))}
    wanted.update(token_capture(meta, wanted))
    return [f"encoder={meta.encoder.name}", *(f"{k}={v}" for k, v in wanted.items())]


def import_config(benchmark: str, data: Path, limit: int | None):
    """The benchmark's ImportConfig as its shipped pipeline has it, writing under ``data``."""
    import yaml

    from training.data.import_config import ImportConfig

    path, section = BENCHMARKS[benchmark]["import"]
    raw = yaml.safe_load((ROOT / path).read_text())
    raw = dict(raw[section]) if section else raw
    raw.update(output=str(data / "queries.parquet"), labels=str(data / "labels"), limit=limit or None)
    return ImportConfig.model_validate(raw)


def prepare(work: Path, benchmark: str, limit: int | None = None) -> dict:
    """Import the benchmark (``limit``: its first rows of each file, for a smoke run) and capture every
    prompt once (both resumable)."""
    from shared.config import load_config
    from training.capture.run import CaptureConfig, run_capture
    from training.data.importer import run_import

    cfg = import_config(benchmark, data := work / benchmark, limit)
    if not (data / "labels" / "import-manifest.json").is_file():
        run_import(cfg)
    bank = work / "bank"
    run_capture(load_config(CaptureConfig, None, [
        f"queries={cfg.output}", f"out={bank}", *bank_capture(benchmark), "shard_size=256", "batch_size=8",
        "max_batch_tokens=8192", "min_shared_prefix=64", "max_actors=2", "progress=false"]))
    return {"queries": cfg.output, "labels": cfg.labels, "bank": str(bank), "benchmark": benchmark}


def traffic(queries: str, labels: str, seed: int, seed_share: float, replay: int) -> dict:
    """Seed rows, replayed rows (train + val, shuffled), held-out rows (test) and every label."""
    import pyarrow.parquet as pq

    from training.labels import load_labels

    rows = pq.read_table(queries).to_pylist()
    pool = [r for r in rows if r["split"] != "test"]
    order = np.random.default_rng(seed).permutation(len(pool))
    n_seed = int(round(seed_share * len(pool)))
    label = {t: {r["query_id"]: r["correct"] for r in table.to_pylist() if r["status"] == "ok"}
             for t, table in load_labels(labels).items()}
    return {"seed": [pool[i] for i in order[:n_seed]], "replay": [pool[i] for i in order[n_seed:n_seed + replay]],
            "held": sum(r["split"] == "test" for r in rows), "label": label}


def write_seed_log(uri: Path, seed_rows: list[dict], label: dict) -> None:
    """The fully labelled start: every target observed on each seed query, the benchmark's label as
    feedback; no propensity (no policy chose among them), so the off-policy estimates leave these rows out."""
    from shared import storage
    from shared.decision_log import DecisionRecord, FeedbackRecord, part_uri, prompt_hash

    if (uri / "decisions").is_dir():
        return
    decisions, feedback, now = [], [], time.time()
    for row in seed_rows:
        messages = [dict(m) for m in row["messages"]]
        for target, by_id in label.items():
            if row["query_id"] not in by_id:
                continue
            rid = f"seed-{row['query_id']}-{target}"
            decisions.append(DecisionRecord(request_id=rid, time=now, endpoint="route", model="router",
                                            target=target, prompt_hash=prompt_hash(messages),
                                            messages=json.dumps(messages, ensure_ascii=False)))
            feedback.append(FeedbackRecord(request_id=rid, time=now, score=by_id[row["query_id"]], source="user"))
    storage.write_parquet(DecisionRecord.table(decisions), part_uri(str(uri), "decisions", now, "seed", 1))
    storage.write_parquet(FeedbackRecord.table(feedback), part_uri(str(uri), "feedback", now, "seed", 1))


def retrain(state_file: Path, run: Path, logs: list[Path], data: dict, serve_yaml: Path | None) -> dict:
    """The from-logs pipeline as a Ray job (``prefill-router submit run``); the published pointer after it."""
    from shared.artifact import read_meta
    from shared.features import parse_block

    meta = read_meta(str(ROOT / BENCHMARKS[data["benchmark"]]["ceiling"]))
    blocks = sorted(BENCHMARKS[data["benchmark"]]["blocks"])
    layers, poolings = (sorted({parse_block(b)[i] for b in blocks}) for i in (0, 1))
    overrides = [
        f"work_dir={run}", f"targets=[{', '.join(t.name for t in meta.targets)}]",
        f"data_import.inputs=[{', '.join(map(str, logs))}]", f"capture.reuse=[{data['bank']}]",
        f"capture.layers=[{', '.join(map(str, layers))}]", f"capture.poolings=[{', '.join(poolings)}]",
        f"fit.blocks=[{', '.join(blocks)}]", "fit.n_components=64", "fit.train.seeds=3", "fit.train.keep=3",
        *BENCHMARKS[data["benchmark"]]["fit"],
        "evaluate.routers=[]", f"publish.uri={run.parent / 'published'}/{{run_id}}",
        f"publish.pointer={run.parent / 'pointer.json'}", "publish.metric=dr_accuracy", "publish.refused_exit_code=0",
        f"publish.reload_serve_app={'null' if serve_yaml is None else '{serve_config: ' + str(serve_yaml) + '}'}",
    ]
    cmd = [sys.executable, "-m", "cluster.cli", "submit", "run", "configs/pipeline-from-logs.yaml", *overrides,
           "--state-file", str(state_file)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the retraining job failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads((run.parent / "pointer.json").read_text())


def held_out(artifact: str, data: dict, out: Path) -> dict:
    """Accuracy and mean cost of ``artifact`` on the test rows (full labels), with the best single model's."""
    from shared.config import load_config
    from training.evaluate.run import EvalConfig, run_evaluation

    cfg = load_config(EvalConfig, None, [f"artifact={artifact}", f"activations={data['bank']}",
                                         f"labels={data['labels']}", f"queries={data['queries']}",
                                         "routers=[]", "write_operating_point=false", f"out={out}"])
    report = run_evaluation(cfg)
    row, refs = report.router("prefill-router"), report.subsets["test"].references
    out = {"accuracy": float(row.accuracy), "cost": float(row.cost), "n": refs.n,
           "best_single": {"name": refs.best_single.target, "accuracy": float(refs.best_single.accuracy),
                           "cost": float(refs.best_single.cost)}}
    if row.task_averaged_accuracy is not None:  # the rows have tasks: RouterDC's metric
        out["task_averaged_accuracy"] = float(row.task_averaged_accuracy)
    if BENCHMARKS[data["benchmark"]]["headline"] == "task_averaged_accuracy":  # the best single by that metric
        single = refs.single[name := refs.best_single_task_averaged.target]
        out["best_single"] = {"name": name, "accuracy": float(single.accuracy), "cost": float(single.cost),
                              "task_averaged_accuracy": float(single.task_averaged_accuracy)}
    return out


def serve_config(path: Path, artifact: str, log: Path, epsilon: float, port: int, seed: int) -> Path:
    """The decision service's serve config (also what the retraining job reloads in place)."""
    import yaml

    cfg = {"artifact": artifact, "targets": [], "http_port": port, "max_prompt_tokens": 4096,
           "decision_log": {"uri": str(log), "keep_prompts": True, "part_s": 1.0},
           "exploration": {"epsilon": epsilon, "max_cost_ratio": None, "seed": seed},
           "encoder_batch": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005},
           # 0.6 CPU in all: a retraining job's Ray Train worker needs 1 of the 2 while the app serves
           "encoder": {"num_cpus": 0.4}, "head": {"num_cpus": 0.1}, "ingress": {"num_cpus": 0.1}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def replay(url: str, rows: list[dict], label: dict) -> dict[str, int]:
    """Route each row, then send the benchmark's label of the named target as its feedback."""
    import httpx

    sent = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        for row in rows:
            body = client.post("/v1/route", json={"messages": [dict(m) for m in row["messages"]]}).raise_for_status().json()
            score = label.get(body["target"], {}).get(row["query_id"])
            if score is not None:  # RouterBench leaves a few cells unlabelled: no feedback then
                client.post("/v1/feedback", json={"request_id": body["id"], "score": score}).raise_for_status()
                sent += 1
    return {"requests": len(rows), "feedback": sent}


def explored_share(log: Path) -> float:
    from shared.decision_log import read_log

    flags = [bool(x) for x in read_log(str(log), "decisions").column("explored").to_pylist()]
    return sum(flags) / len(flags) if flags else 0.0


def run_epsilon(epsilon: float, args: argparse.Namespace, data: dict, rows: dict, state_file: Path) -> list[dict]:
    """One learning curve: start from the seed log, replay, retrain every ``args.every`` requests."""
    from cluster.demo_chat import wait_ready
    from serving.app import deploy
    from serving.config import ServeConfig
    from shared.config import load_config
    from cluster.local import free_port

    home = Path(args.work) / f"eps-{epsilon:g}"
    if (home / "points.json").is_file():  # this curve is done (a rerun adds the others)
        return json.loads((home / "points.json").read_text())
    seed_log, log = Path(args.work) / "seed-log", home / "log"
    write_seed_log(seed_log, rows["seed"], rows["label"])
    first = retrain(state_file, home / "run-000", [seed_log], data, None)
    serve_yaml = serve_config(home / "serve.yaml", first["artifact"], log, epsilon, port := free_port(), args.seed)
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})  # a fresh Serve on this curve's port
    deploy(load_config(ServeConfig, str(serve_yaml), []))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 600)
    points = [{"epsilon": epsilon, "logged": 0, "published": first["artifact"], "explored_share": 0.0,
               **held_out(first["artifact"], data, home / "held-000")}]
    for i, start in enumerate(range(0, len(rows["replay"]), args.every), 1):
        replay(url, rows["replay"][start:start + args.every], rows["label"])
        time.sleep(2.5)  # the log's last part (part_s 1 s) is written
        pub = retrain(state_file, home / f"run-{i:03d}", [seed_log, log], data, serve_yaml)
        points.append({"epsilon": epsilon, "logged": start + len(rows["replay"][start:start + args.every]),
                       "published": pub["artifact"], "explored_share": explored_share(log),
                       **held_out(pub["artifact"], data, home / f"held-{i:03d}")})
        print(json.dumps({k: v for k, v in points[-1].items() if k in (*FIELDS, "task_averaged_accuracy")}), flush=True)
    serve.shutdown()
    (home / "points.json").write_text(json.dumps(points, indent=1))
    return points


def add_candidates(points: list[dict], work: Path, data: dict) -> None:
    """Each retraining's own router (``run-XXX/router``, published or not) on the held-out rows: what the
    gate let through or held back."""
    for i, point in enumerate(points):
        if "candidate_accuracy" in point:
            continue
        home = work / f"eps-{point['epsilon']:g}"
        scored = held_out(str(home / f"run-{i:03d}" / "router"), data, home / f"candidate-{i:03d}")
        point.update(candidate_accuracy=scored["accuracy"], candidate_cost=scored["cost"])
        if "task_averaged_accuracy" in scored:
            point["candidate_task_averaged_accuracy"] = scored["task_averaged_accuracy"]


def headline(result: dict) -> tuple[str, str]:
    """The accuracy the curve is drawn in: the benchmark's own (RouterDC: task-averaged)."""
    key = BENCHMARKS[result["args"].get("benchmark", "routerbench")]["headline"]
    return key, key.replace("task_averaged_", "task-averaged ")


def equal_costs(result: dict) -> bool:
    """Every target costs alike (RouterDC): no cost panel or columns, whose axis would have zero width."""
    costs = [result["ceiling"]["cost"], result["ceiling"]["best_single"]["cost"]]
    costs += [p[k] for p in result["points"] for k in ("cost", "candidate_cost")]
    return max(costs) - min(costs) <= 1e-12 * max(1.0, max(costs))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, what = headline(result)
    flat = equal_costs(result)
    fig, axes = plt.subplots(1, 1 if flat else 2, figsize=(8 if flat else 11, 4.8), squeeze=False)
    acc, cost = axes[0][0], None if flat else axes[0][1]
    for eps in sorted({p["epsilon"] for p in result["points"]}):
        pts = [p for p in result["points"] if p["epsilon"] == eps]
        x = [p["logged"] for p in pts]
        line = acc.plot(x, [100 * p[key] for p in pts], marker="o", label=f"epsilon {eps:g}: served")[0]
        acc.plot(x, [100 * p[f"candidate_{key}"] for p in pts], marker="x", ls=":", color=line.get_color(),
                 label=f"epsilon {eps:g}: each retraining's router")
        if cost is not None:
            cost.plot(x, [p["cost"] for p in pts], marker="o", label=f"epsilon {eps:g}: served")
            cost.plot(x, [p["candidate_cost"] for p in pts], marker="x", ls=":", color=line.get_color())
    best = result["ceiling"]["best_single"]
    for ax, k, scale in ((acc, key, 100), (cost, "cost", 1)):
        if ax is None:
            continue
        ax.axhline(scale * result["ceiling"][k], color="black", ls="--", label="trained on every train label")
        ax.axhline(scale * best[k], color="grey", ls=":", label=f"best single ({best['name']})")
        ax.set_xlabel("logged requests (with feedback)")
    title = BENCHMARKS[result["args"].get("benchmark", "routerbench")]["title"]
    acc.set_ylabel(f"held-out {what}, %\n({result['ceiling']['n']} {title} test queries)")
    if cost is not None:
        cost.set_ylabel("held-out mean cost per query (USD)")
    if flat:  # one panel: room under the curves for the legend, clear of the best single's line
        low, high = acc.get_ylim()
        acc.set_ylim(low - 0.45 * (high - low), high)
        acc.legend(fontsize=8, loc="lower center", ncol=2)
    else:
        acc.legend(fontsize=8)
    share = 100 * result["args"].get("seed_share", 0.1)
    fig.suptitle(f"{title}: a router retrained on its own decision log (start: {share:g}% of the labels)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def table(result: dict) -> str:
    """Markdown: per point the served router and this retraining's own router; cost columns unless
    every target costs alike; the task-averaged accuracy first where the rows have tasks."""
    key, what = headline(result)
    cols = [(key, what)] + ([("accuracy", "pooled accuracy")] if key != "accuracy" else [])
    cols += [] if equal_costs(result) else [("cost", "mean cost (USD)")]

    def cells(row: dict, prefix: str = "") -> list[str]:
        return [f"{row[prefix + k]:.5f}" if k == "cost" else f"{100 * row[prefix + k]:.2f}%" for k, _ in cols]

    head = ["epsilon", "logged requests", "explored", *(f"served router: {w}" for _, w in cols),
            *(f"this retraining's router (published or not): {w}" for _, w in cols)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for p in result["points"]:
        lines.append("| " + " | ".join([f"{p['epsilon']:g}", str(p["logged"]), f"{100 * p['explored_share']:.1f}%",
                                        *cells(p), *cells(p, "candidate_")]) + " |")
    pad = [""] * len(cols)
    c, b = result["ceiling"], result["ceiling"]["best_single"]
    lines.append("| " + " | ".join(["trained on every train label (the shipped router)", "", "", *cells(c), *pad]) + " |")
    lines.append("| " + " | ".join([f"best single ({b['name']})", "", "", *cells(b), *pad]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="routerbench")
    ap.add_argument("--work", default=None, help="Work folder (default runs/learning-loop[-<benchmark>]); outside "
                    "the repository for real runs: a Ray job's upload leaves runs/ out.")
    ap.add_argument("--replay", type=int, default=800, help="Replayed requests per epsilon.")
    ap.add_argument("--every", type=int, default=200, help="Retrain after this many requests.")
    ap.add_argument("--epsilon", type=float, nargs="+", default=[0.0, 0.2])
    ap.add_argument("--seed-share", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="Benchmark rows per file (a smoke run).")
    ap.add_argument("--json", default=None, help="Default bench/results/learning_loop[_<benchmark>].json.")
    ap.add_argument("--plot", default=None, help="Default: the JSON's path with .png.")
    args = ap.parse_args()
    suffix = "" if args.benchmark == "routerbench" else f"_{args.benchmark}"
    args.work = args.work or str(ROOT / "runs" / f"learning-loop{suffix.replace('_', '-')}")
    args.json = args.json or str(ROOT / "bench" / "results" / f"learning_loop{suffix}.json")
    args.plot = args.plot or str(Path(args.json).with_suffix(".png"))
    from cluster.demo import start_cluster, stop_cluster

    work, t0 = Path(args.work), time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    cfg, state = start_cluster(work)
    try:
        data = prepare(work, args.benchmark, args.limit)
        rows = traffic(data["queries"], data["labels"], args.seed, args.seed_share, args.replay)
        points = []
        for eps in args.epsilon:
            curve = run_epsilon(eps, args, data, rows, Path(cfg.state_file))
            add_candidates(curve, work, data)
            points += curve
        top = held_out(str(ROOT / BENCHMARKS[args.benchmark]["ceiling"]), data, work / "held-ceiling")
    finally:
        stop_cluster(cfg)
    result = {"date": dt.date.today().isoformat(), "seconds": round(time.perf_counter() - t0),
              "args": vars(args), "seed_rows": len(rows["seed"]), "pool": len(rows["seed"]) + len(rows["replay"]),
              "points": points, "ceiling": top}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.plot))
    print(table(result))


if __name__ == "__main__":
    main()
