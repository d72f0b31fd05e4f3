#!/usr/bin/env python
"""Training speed of every layer option in float32 and in bf16 autocast: the bare loop of benchmark.py (the default
recipe's optimizer and batch, pre-loaded tensors, no Lightning) on the documented model with one option of
model/pool, model/activation, model/norm or model/dropout changed, then experiment=best's network. The two precisions
alternate within each round, and the rates are medians over the rounds: is `trainer.precision=auto`, which picks
bf16-mixed on a CPU that computes bf16, at least as fast as float32 for each option?

    .venv/bin/python scripts/layer_speed.py --data-root data --out docs/results/cpu-bf16/layer-speed.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import cifarlab  # noqa: F401  first: its environment defaults must precede torch's first tensor
import torch

from benchmark import REPO, BareLoop, compose, device_name, save, sync

GROUPS = ("pool", "activation", "norm", "dropout")
PRECISIONS = ("32-true", "bf16-mixed")


def options() -> list[tuple[str, list[str]]]:
    """(name, overrides): every option of each layer group, then the best recipe's network."""
    out = [(f"{group}={path.stem}", [f"model/{group}={path.stem}"]) for group in GROUPS
           for path in sorted((REPO / "configs" / "model" / group).glob("*.yaml"))]
    return out + [("experiment=best", ["experiment=best", "data.batch_size=256"])]  # one batch size for all


def rate(loop: BareLoop, steps: int, batch_size: int) -> float:
    """Training images/s over `steps` steps, after two untimed ones (first-call allocations)."""
    order = torch.randint(len(loop.train_y), (steps + 2, batch_size))
    for idx in order[:2]:
        loop.step(loop.train_x[idx], loop.train_y[idx])
    start = sync(loop.device)
    for idx in order[2:]:
        loop.step(loop.train_x[idx], loop.train_y[idx])
    return steps * batch_size / (sync(loop.device) - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/ (or that folder itself)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per measurement (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="measurements per option and precision (default 3)")
    p.add_argument("--only", help="comma-separated option names (e.g. pool=blurmax,experiment=best)")
    args = p.parse_args()
    from cifarlab.data import cifar10

    device = torch.device("cpu")  # the question is the CPU's; a GPU's bf16 is never slower here
    root = str(Path(args.data_root).resolve())
    arrays = cifar10.load_cifar10(root, download=False)
    chosen = [(n, o) for n, o in options() if args.only is None or n in args.only.split(",")]
    if not chosen:
        p.error(f"--only {args.only}: no such option; choose from {', '.join(n for n, _ in options())}")
    results = {}
    for name, overrides in chosen:
        loops = {precision: BareLoop(compose([f"data.root={root}", *overrides, f"trainer.precision={precision}"]),
                                     arrays, device) for precision in PRECISIONS}
        batch_size = int(compose([f"data.root={root}", *overrides]).data.batch_size)
        rates = {precision: [] for precision in PRECISIONS}
        for r in range(args.rounds):
            for precision in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
                rates[precision].append(rate(loops[precision], args.steps, batch_size))
        fp32, bf16 = (statistics.median(rates[precision]) for precision in PRECISIONS)
        results[name] = {"fp32_img_per_s": round(fp32, 1), "bf16_img_per_s": round(bf16, 1),
                         "ratio": round(bf16 / fp32, 3), "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()}}
        print(f"| {name} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f} |", flush=True)
    out = {"device": device_name(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "torch": torch.__version__,
           "data_source": arrays.source, "steps": args.steps, "rounds": args.rounds, "results": results}
    slower = [n for n, r in results.items() if r["ratio"] < 1]
    print(f"\n{out['device']}; slower in bf16: {', '.join(slower) or 'none'}")
    save(out, args.out)


if __name__ == "__main__":
    main()
