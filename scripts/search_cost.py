#!/usr/bin/env python
"""What an Optuna search cost and found, one row per search folder (cifarlab-train -m hparams_search=...):

    .venv/bin/python scripts/search_cost.py outputs/search/a outputs/search/b --out docs/results/<name>/cost.json

Per folder: its trials by state, the epochs they trained, the sweep's wall time (its multirun.yaml, written as it
started, to its search.json, written as it ended), the trials' own wall time (metrics.json's wall_s), and the best
trial's val/acc and test/acc. With two folders or more, every wall time also as a ratio to the first folder's; with
two, also the trials they share (the same parameters under the same trial number, as two studies with one sampler
seed ask at first): what the second did with each and what it reached in the first. Prints Markdown tables; --out
also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cost(folder: Path) -> dict:
    found = json.loads((folder / "search.json").read_text())
    jobs = [json.loads(p.read_text()) for p in sorted(folder.glob("*/metrics.json"))]
    best = found["best"] or {}
    best_metrics = json.loads((folder / best["folder"] / "metrics.json").read_text()) if best else {}
    return {
        "folder": str(folder),
        "trials": found["trials"],
        "epochs_trained": sum(m["epochs"] for m in jobs),
        "sweep_wall_s": (folder / "search.json").stat().st_mtime - (folder / "multirun.yaml").stat().st_mtime,
        "trials_wall_s": sum(m["wall_s"] for m in jobs),
        "best_trial": best.get("trial"),
        "best_val_acc": best.get("value"),
        "best_test_acc": best_metrics.get("test_acc"),
        "best_params": best.get("params"),
    }


def trials(folder: Path) -> list[dict]:
    """Each job's trial number, parameters (its overrides), state and val/acc per epoch, from its folder."""
    out, searched = [], cost(folder)["best_params"] or {}
    for path in sorted(folder.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        params = [o for o in m["overrides"] if o.split("=", 1)[0] in searched]
        out.append({"trial": m["trial"], "params": sorted(params), "pruned": m["pruned"], "epochs": m["epochs"],
                    "best_val_acc": m["best_val_acc"]})
    return sorted(out, key=lambda t: t["trial"])


def shared(first: Path, second: Path) -> None:
    a = {t["trial"]: t for t in trials(first)}
    ranked = sorted((t["best_val_acc"] for t in a.values()), reverse=True)
    print(f"\n| trial | `{second.name}` | val/acc in `{first.name}` | its rank of {len(ranked)} |")
    print("| ---: | --- | ---: | ---: |")
    for t in trials(second):
        same = a.get(t["trial"])
        if same is None or same["params"] != t["params"]:
            break
        did = f"pruned after epoch {t['epochs']}" if t["pruned"] else f"ran all {t['epochs']} epochs"
        print(f"| {t['trial']} | {did} | {100 * same['best_val_acc']:.2f} % | {ranked.index(same['best_val_acc']) + 1} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = [cost(f) for f in args.folders]
    first = rows[0]
    print("| search | trials | epochs trained | sweep wall time | ratio | trials' wall time | ratio | best trial: val/acc, test/acc |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        states = ", ".join(f"{n} {s}" for s, n in sorted(r["trials"].items()))
        print(f"| `{Path(r['folder']).name}` | {states} | {r['epochs_trained']} | {r['sweep_wall_s'] / 60:.1f} min | "
              f"{r['sweep_wall_s'] / first['sweep_wall_s']:.2f} | {r['trials_wall_s'] / 60:.1f} min | "
              f"{r['trials_wall_s'] / first['trials_wall_s']:.2f} | trial {r['best_trial']}: "
              f"{100 * r['best_val_acc']:.2f} %, {100 * r['best_test_acc']:.2f} % |")
    if len(args.folders) == 2:
        shared(*args.folders)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
