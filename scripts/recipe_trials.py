#!/usr/bin/env python
"""Variants of experiment=best, several seeds each, many runs at once; each run's best and last checkpoints scored.

    .venv/bin/python scripts/recipe_trials.py --data-root DIR --out trials.jsonl [--jobs N] [--seeds 0-3] \
        base lr0.15=optimizer.lr=0.15 wd1e-3=optimizer.weight_decay=1e-3,label_smoothing=0.05 ...

A variant is NAME=OVERRIDE[,OVERRIDE...] (cifarlab-train overrides on top of experiment=best; an override with a
comma of its own, a list, cannot be given here), or a NAME alone for experiment=best as it is. Jobs run seed by seed (every variant of seed 0, then of seed 1, ...), N at a time, each a
`cifarlab-train experiment=best <overrides> seed=S callbacks=plain threads=1` in its own folder under --runs. When one
finishes, its checkpoints/best.ckpt and last.ckpt are scored on the test set the way the run tests (its own test-time
views, bf16 autocast on a GPU), so every run gives both figures: which checkpoint to test is compared on the same
training runs. One JSON line per finished run goes to --out as it finishes, then a table of means per variant.

On one GPU the documented model leaves the device mostly idle (a run is bound by its host's Python), so about one
job per CPU core keeps it busy. --deadline S starts no job that would end after S seconds (judged by the median of
the runs so far) and stops the ones still running 20 s after it (their rows say so). `--summarize FILE` prints the table of a finished
--out file again (docs/performance.md's tables come from it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    return name, [o for o in overrides.split(",") if o]


def parse_seeds(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def score(run_dir: Path, ckpt: Path) -> float:
    """Test accuracy of a run's checkpoint with the run's own test-time views (cifarlab-eval's scoring)."""
    from cifarlab.evaluate import run_config, run_precision
    from cifarlab.evaluate import score as evaluate

    cfg = run_config(run_dir, None)
    return evaluate(cfg, ckpt, bool(cfg.test_flips), int(cfg.test_shift), run_precision(run_dir, cfg))["test_acc"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", help="NAME or NAME=OVERRIDE[,OVERRIDE...]")
    p.add_argument("--data-root", help="folder holding cifar-10-batches-py/")
    p.add_argument("--out", type=Path, help="JSON lines, one per finished run (appended)")
    p.add_argument("--summarize", type=Path, metavar="JSONL", help="only print the table of an earlier --out file")
    p.add_argument("--seeds", default="0-3", help="seeds, FIRST-LAST (default 0-3)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    p.add_argument("--deadline", type=float, default=float("inf"), help="seconds; see above")
    p.add_argument("--runs", type=Path, default=Path("outputs/trials"), help="run folders go here")
    p.add_argument("--extra", default="", help="more overrides for every run, space-separated (tests shrink runs)")
    args = p.parse_args()
    if args.summarize:
        rows = [json.loads(line) for line in args.summarize.read_text().splitlines() if line.strip()]
        print(summary(rows, list(dict.fromkeys(r["name"] for r in rows))))
        return
    if not (args.variants and args.data_root and args.out):
        p.error("give variants, --data-root and --out (or --summarize JSONL)")
    variants = dict(parse_variant(v) for v in args.variants)
    if len(variants) != len(args.variants):
        sys.exit("two variants have the same name")
    queue = [(name, seed) for seed in parse_seeds(args.seeds) for name in variants]
    import cifarlab  # noqa: F401  (its thread settings before torch loads); torch and Lightning only for a real study

    args.runs.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start, durations, running, rows = time.time(), [], [], []

    def launch(name: str, seed: int) -> dict:
        run_dir = args.runs / f"{name}_s{seed}"
        overrides = ["experiment=best", *variants[name], f"seed={seed}", "callbacks=plain", "threads=1",
                     f"data.root={args.data_root}", f"hydra.run.dir={run_dir}", *args.extra.split()]
        log = open(args.runs / f"{name}_s{seed}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "cifarlab.cli", *overrides], stdout=log,
                                stderr=subprocess.STDOUT)
        return {"proc": proc, "log": log, "name": name, "seed": seed, "dir": run_dir, "overrides": overrides,
                "started": time.time()}

    def finish(job: dict, stopped: bool = False) -> None:
        job["log"].close()
        row = {"name": job["name"], "seed": job["seed"], "overrides": job["overrides"],
               "rc": job["proc"].returncode, "wall_s": round(time.time() - job["started"], 1)}
        if stopped:
            row["error"] = "stopped at the deadline"
        else:
            durations.append(row["wall_s"])
            try:
                m = json.loads((job["dir"] / "metrics.json").read_text())
                row.update(test_acc=m["test_acc"], test_acc_no_tta=m.get("test_acc_no_tta"),
                           tested_checkpoint=m.get("tested_checkpoint"), best_val_acc=m["best_val_acc"],
                           epoch_s=m["epoch_s"], device=m["device_name"], precision=m["precision"])
                for which in ("best", "last"):
                    ckpt = job["dir"] / "checkpoints" / f"{which}.ckpt"
                    row[f"score_{which}"] = score(job["dir"], ckpt)
            except Exception as e:  # noqa: BLE001 - one run's failure (no metrics, no checkpoint, out of memory)
                row["error"] = f"{type(e).__name__}: {e}"[:300]  # is recorded, and the others go on
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{time.time() - start:5.0f} s] {row['name']} seed {row['seed']}: best.ckpt {row.get('score_best')}, "
              f"last.ckpt {row.get('score_last')} ({row['wall_s']} s){' ' + row['error'] if 'error' in row else ''}",
              flush=True)

    try:
        while queue or running:
            expected = statistics.median(durations) if durations else 0.0
            while queue and len(running) < args.jobs and time.time() - start + expected < args.deadline:
                running.append(launch(*queue.pop(0)))
            if queue and not running:
                print(f"deadline: {len(queue)} runs not started", flush=True)
                queue.clear()
            for job in list(running):
                if job["proc"].poll() is not None:
                    running.remove(job)
                    finish(job)
            if time.time() - start > args.deadline + 20:
                while running:
                    job = running.pop()
                    job["proc"].kill()
                    job["proc"].wait()
                    finish(job, stopped=True)
                break
            time.sleep(1)
    finally:  # an exception or Ctrl-C here leaves no training process behind
        for job in running:
            job["proc"].kill()

    print(summary(rows, list(variants)))


def summary(rows: list[dict], names: list[str]) -> str:
    """Markdown: per variant, the runs scored and the mean ± std test accuracy of each checkpoint. A (variant, seed)
    that appears twice (the same --out file appended to again) counts once, with its latest row."""
    rows = list({(r["name"], r["seed"]): r for r in rows}.values())
    lines = ["| variant | runs | seeds | best.ckpt % | last.ckpt % | last - best | runs >= 85 % (last) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name in names:
        done = [r for r in rows if r["name"] == name and "score_last" in r]
        if not done:
            lines.append(f"| {name} | 0 | | | | | |")
            continue
        cells = []
        for key in ("score_best", "score_last"):
            xs = [100 * r[key] for r in done]
            cells.append(f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}")
        gain = statistics.mean(100 * (r["score_last"] - r["score_best"]) for r in done)
        seeds = ",".join(str(s) for s in sorted(r["seed"] for r in done))
        hits = sum(r["score_last"] >= 0.85 for r in done)
        lines.append(f"| {name} | {len(done)} | {seeds} | {cells[0]} | {cells[1]} | {gain:+.2f} | {hits} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
