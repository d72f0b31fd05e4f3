#!/usr/bin/env python
"""What TensorBoard inspection costs: the default callbacks against callbacks=plain, runs alternating, medians.

    .venv/bin/python scripts/inspection_cost.py --data-root ../shared/data/cifar10-full --epochs 3 --pairs 2

Prints a Markdown table: median training seconds per epoch (validation excluded, as metrics.json's epoch_s) and
median wall seconds per run (start to metrics.json: data loading, training, validation, test, all logging), and
each as a ratio with inspection / without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CLI = Path(sys.executable).parent / "cifarlab-train"


def run(data_root: str, epochs: int, extra: list[str], out: Path) -> dict:
    cmd = [str(CLI), f"data.root={data_root}", f"trainer.max_epochs={epochs}", f"hydra.run.dir={out}", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--pairs", type=int, default=2)
    args = p.parse_args()
    results: dict[str, list[dict]] = {"default": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for name, extra in (("plain", ["callbacks=plain"]), ("default", [])):
                results[name].append(run(args.data_root, args.epochs, extra, Path(tmp) / f"{name}{i}"))
                print(f"pair {i}: {name} epoch_s={results[name][-1]['epoch_s']:.2f} "
                      f"wall_s={results[name][-1]['wall_s']:.1f}", file=sys.stderr)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("epoch_s", "wall_s")} for n, rs in results.items()}
    print(f"| callbacks | s/epoch (training) | s/run (wall, {args.epochs} epochs) |")
    print("| --- | ---: | ---: |")
    for name in ("plain", "default"):
        print(f"| {name} | {med[name]['epoch_s']:.2f} | {med[name]['wall_s']:.1f} |")
    print(f"| ratio default / plain | {med['default']['epoch_s'] / med['plain']['epoch_s']:.3f} | "
          f"{med['default']['wall_s'] / med['plain']['wall_s']:.3f} |")


if __name__ == "__main__":
    main()
