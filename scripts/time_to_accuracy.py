#!/usr/bin/env python
"""Time to accuracy, in one process on whatever device is present:

  1. tutorial   the seed tutorial's recipe (benchmark.py's Tutorial: torchvision CIFAR10 + ToTensor, batch 64, SGD
                lr 0.01) for 10 epochs; its test accuracy after the last epoch is the target.
  2. cifarlab   cifarlab.train.train() with the default config (or the overrides given): after every epoch the test
                set is scored with the clock paused, and the run stops at the first epoch that reaches the target.

Wall time counts from the start of the first training epoch to the end of the epoch that reached the target: for
cifarlab that is training, validation, logging and checkpoints, everything but the probe's own test passes; for the
tutorial, its 10 training epochs. The ratio cifarlab / tutorial is the figure (target <= 0.2, aim 0.1).

    .venv/bin/python scripts/time_to_accuracy.py --data-root ../shared/data/cifar10-full \\
        --out docs/time-to-accuracy-cpu.json

--target ACC skips the tutorial and uses ACC; --quick trains a few batches (tests run it; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch

import benchmark


class TestAccuracyProbe(L.Callback):
    """After each training epoch (validation included): the test accuracy and the wall time so far, probes excluded."""

    def __init__(self, target: float, max_batches: int | None):
        self.target, self.max_batches = target, max_batches
        self.epochs: list[dict] = []
        self._start = 0.0
        self._paused = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self.epochs and not self._start:
            self._start = benchmark.sync(pl_module.device)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        now = benchmark.sync(pl_module.device)
        loader = trainer.datamodule.test_dataloader()
        correct = total = 0
        pl_module.eval()
        with torch.no_grad():
            for b, (x, y) in enumerate(loader):
                if self.max_batches is not None and b >= self.max_batches:
                    break
                correct += int((pl_module.eval_logits(x).argmax(1) == y).sum())
                total += len(y)
        pl_module.train()
        acc = correct / total
        self.epochs.append({"epoch": len(self.epochs) + 1, "test_acc": acc,
                            "wall_s": now - self._start - self._paused})
        self._paused += benchmark.sync(pl_module.device) - now
        if acc >= self.target:
            trainer.should_stop = True

    def reached(self) -> dict | None:
        return next((e for e in self.epochs if e["test_acc"] >= self.target), None)


def run_tutorial(data_root: str, device: torch.device, epochs: int, max_batches: int | None) -> dict:
    recipe = benchmark.Tutorial(data_root, device)
    by_epoch, wall = [], 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        recipe.epoch(max_batches)
        wall += time.perf_counter() - start
        by_epoch.append({"epoch": epoch + 1, "wall_s": wall,
                         "test_acc": benchmark.accuracy(recipe.model, recipe.test_batches(max_batches), device)})
    return {"test_acc": by_epoch[-1]["test_acc"], "wall_s": wall, "epochs": by_epoch}


def run_cifarlab(overrides: list[str], target: float, max_batches: int | None) -> dict:
    from cifarlab import train

    limits = [] if max_batches is None else [f"trainer.limit_train_batches={max_batches}",
                                              f"trainer.limit_val_batches={max_batches}",
                                              f"trainer.limit_test_batches={max_batches}"]
    cfg = train.settle(benchmark.compose([*overrides, *limits]))
    probe = TestAccuracyProbe(target, max_batches)
    with tempfile.TemporaryDirectory() as tmp:
        train.train(cfg, Path(tmp), extra_callbacks=[probe])
    hit = probe.reached()
    return {"reached": hit is not None, "epoch": hit["epoch"] if hit else None,
            "wall_s": hit["wall_s"] if hit else None, "max_epochs": int(cfg.trainer.max_epochs),
            "epochs": probe.epochs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/ (or that folder itself)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--target", type=float, help="test accuracy to reach (default: the tutorial's after 10 epochs)")
    p.add_argument("--tutorial-epochs", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="a few batches per epoch: a smoke test")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("overrides", nargs="*", help="cifarlab config overrides (e.g. trainer.max_epochs=3)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    max_batches = 3 if args.quick else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = [f"data.root={Path(args.data_root).resolve()}", f"threads={torch.get_num_threads()}",
                 *args.overrides]

    tutorial = None
    if args.target is None:
        tutorial = run_tutorial(args.data_root, device, 2 if args.quick else args.tutorial_epochs, max_batches)
    target = args.target if args.target is not None else tutorial["test_acc"]
    cifarlab = run_cifarlab(overrides, target, max_batches)
    ratio = cifarlab["wall_s"] / tutorial["wall_s"] if tutorial and cifarlab["reached"] else None
    out = {
        "device": benchmark.device_name(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "torch": torch.__version__,
        "quick": args.quick,
        "target_test_acc": target,
        "tutorial": tutorial,
        "cifarlab": cifarlab,
        "ratio_wall_s": ratio,
    }
    print(f"\n{out['device']}: target test accuracy {target:.4f}")
    if tutorial:
        print(f"tutorial: {tutorial['test_acc']:.4f} after {len(tutorial['epochs'])} epochs, {tutorial['wall_s']:.1f} s")
    if cifarlab["reached"]:
        print(f"cifarlab: {cifarlab['epochs'][cifarlab['epoch'] - 1]['test_acc']:.4f} after epoch {cifarlab['epoch']}, "
              f"{cifarlab['wall_s']:.1f} s" + (f" -> {ratio:.3f} of the tutorial's time" if ratio else ""))
    else:
        print(f"cifarlab: did not reach it in {cifarlab['max_epochs']} epochs "
              f"(best {max(e['test_acc'] for e in cifarlab['epochs']):.4f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
