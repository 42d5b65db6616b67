"""Ray Train fit time of the SharedTrunkNet seed ensemble with 1 worker against 2 workers.

Both runs train the same seeds on the same features (the reference dataset's blocks
from the probe report, PCA fitted on train once, outside the clock), one after the other
on the same local Ray, each under a fresh run name so nothing is resumed. Each worker
trains one seed per round (``training.fit.train_ray.ensemble_loop``), so 2 workers should
take about half the rounds. Timed: ``train_ensemble`` (trainer start-up, worker group,
every round, checkpoints). Prints a Markdown table and writes JSON.

    .venv/bin/python bench/fit_workers.py                # reference data, 8 seeds
    .venv/bin/python bench/fit_workers.py --seeds 4 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW_FIELDS = ("workers", "seeds", "seconds", "best_val_loss")  # the table's columns (table, bench/README.md)
TABLE_FIELDS = {"rows": ROW_FIELDS}  # what the table reads of the JSON


def load_features(cfg_path: str):
    """Train/val features and labels exactly as ``prefill-router fit`` builds them."""
    from shared.config import load_config
    from training.fit.run import FitConfig, fit_features

    cfg = load_config(FitConfig, cfg_path, [])
    data, _, Xtr, Xva = fit_features(cfg)
    return cfg, Xtr, data.where("train").Y, Xva, data.where("val").Y


def time_fit(cfg, arrays, workers: int, seeds: int, storage: str) -> dict:
    from training.fit.train_ray import train_ensemble

    run = cfg.train.model_copy(update={"num_workers": workers, "seeds": seeds, "keep": min(cfg.train.keep, seeds),
                                       "cpus_per_worker": 1.0, "storage_path": storage,
                                       "name": f"bench-{workers}w-{time.time_ns()}"})
    t0 = time.perf_counter()
    members, _ = train_ensemble(*arrays, run)
    seconds = time.perf_counter() - t0
    return {"workers": workers, "seeds": seeds, "seconds": round(seconds, 1),
            "best_val_loss": round(members[0].val_loss, 5), "epochs_run": [m.epochs_run for m in members]}


def table(rows: list[dict]) -> str:
    base = rows[0]["seconds"]
    lines = ["| workers | seeds | seconds | speed-up vs 1st row | best val loss |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        workers, seeds, seconds, loss = (r[f] for f in ROW_FIELDS)
        lines.append(f"| {workers} | {seeds} | {seconds:.1f} | {base / seconds:.2f}x | {loss:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "fit.yaml"), help="FitConfig YAML (data paths).")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "fit_workers.json"))
    args = parser.parse_args(argv)
    import ray

    from shared.ray_boot import ensure_ray

    cfg, *arrays = load_features(args.config)
    started = ensure_ray("local", num_cpus=max(args.workers), log_to_driver=False)  # or the Ray this process runs
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fit-") as storage:
            rows = [time_fit(cfg, arrays, w, args.seeds, storage) for w in args.workers]
    finally:
        if started:
            ray.shutdown()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs", "n_train": int(arrays[0].shape[0]), "features": int(arrays[0].shape[1]),
              "targets": cfg.targets, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"n_train={result['n_train']}, features={result['features']}, targets={cfg.targets}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
