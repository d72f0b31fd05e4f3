#!/usr/bin/env python
"""Time to accuracy, in one process on whatever device is present:

  1. tutorial   the seed tutorial's recipe (benchmark.py's Tutorial: torchvision CIFAR10 + ToTensor, batch 64, SGD
                lr 0.01) for 10 epochs; its test accuracy after the last epoch is the target.
  2. cifarlab   cifarlab.train.run() with the default config (or the overrides given): four times an epoch
                (--probes-per-epoch) the test set is scored with the clock paused, and the run stops at the first
                probe that reaches the target.

Wall time counts from the start of the first training epoch to the probe that reached the target: for cifarlab that
is training, the validation passes of finished epochs, logging, inspection and checkpoints, everything but the
probes' own test passes; for the tutorial, its 10 training epochs (its per-epoch test passes are not counted).
The ratio cifarlab / tutorial is the figure (target <= 0.2, aim 0.1).

    .venv/bin/python scripts/time_to_accuracy.py --data-root data \\
        --out docs/results/lightning-loop/time-to-accuracy-cpu.json

--target ACC skips the tutorial and uses ACC; --quick trains a few batches (tests run it; the numbers mean nothing);
--also "OVERRIDES" times another recipe against the same target and tutorial, in the same process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import cifarlab  # noqa: F401  first: its environment defaults must precede lightning's first tensor
import lightning as L
import torch

import benchmark


class TestAccuracyProbe(L.Callback):
    """Every `probes_per_epoch`-th of a training epoch: the test accuracy and the wall time so far, probes excluded.

    Scoring only at epoch ends would round a run's time up to whole epochs (about 25 s each on a CPU); a quarter
    epoch is the default resolution. A run asked to stop mid-epoch still validates and checkpoints, as for early
    stopping; that happens after the figure is taken.
    """

    def __init__(self, target: float, max_batches: int | None, probes_per_epoch: int = 4):
        self.target, self.max_batches, self.probes_per_epoch = target, max_batches, probes_per_epoch
        self.probes: list[dict] = []
        self._start = 0.0
        self._paused = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self._start:
            self._start = benchmark.sync(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        per_epoch = trainer.num_training_batches
        marks = {round(per_epoch * k / self.probes_per_epoch) for k in range(1, self.probes_per_epoch + 1)}
        if batch_idx + 1 in marks:  # mark: a count of batches
            self._probe(trainer, pl_module, trainer.current_epoch + (batch_idx + 1) / per_epoch)

    def _probe(self, trainer, pl_module, epoch: float) -> None:
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
        self.probes.append({"epoch": round(epoch, 3), "step": trainer.global_step, "test_acc": acc,
                            "wall_s": now - self._start - self._paused})
        self._paused += benchmark.sync(pl_module.device) - now
        if acc >= self.target:
            trainer.should_stop = True

    def reached(self) -> dict | None:
        return next((e for e in self.probes if e["test_acc"] >= self.target), None)


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


def run_cifarlab(overrides: list[str], target: float, max_batches: int | None, probes_per_epoch: int) -> dict:
    from cifarlab import prepare, train

    limits = [] if max_batches is None else [f"trainer.limit_train_batches={max_batches}",
                                              f"trainer.limit_val_batches={max_batches}",
                                              f"trainer.limit_test_batches={max_batches}"]
    cfg = prepare.settle(benchmark.compose([*overrides, *limits]))
    probe = TestAccuracyProbe(target, max_batches, probes_per_epoch)
    with tempfile.TemporaryDirectory() as tmp:
        train.run(cfg, Path(tmp), extra_callbacks=[probe])
    hit = probe.reached()
    return {"reached": hit is not None, "epoch": hit["epoch"] if hit else None,
            "wall_s": hit["wall_s"] if hit else None, "max_epochs": int(cfg.trainer.max_epochs),
            "probes_per_epoch": probes_per_epoch, "probes": probe.probes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/ (or that folder itself)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--target", type=float, help="test accuracy to reach (default: the tutorial's after 10 epochs)")
    p.add_argument("--tutorial-epochs", type=int, default=10)
    p.add_argument("--probes-per-epoch", type=int, default=4,
                   help="test-set scorings per cifarlab training epoch, the clock paused (default 4)")
    p.add_argument("--quick", action="store_true", help="a few batches per epoch: a smoke test")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--also", action="append", default=[], metavar="OVERRIDES",
                   help="another cifarlab recipe to time against the same target in the same process, as one "
                        "quoted string of overrides (e.g. --also experiment=best); repeatable")
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

    def timed(extra: list[str]) -> dict:
        run = run_cifarlab([*overrides, *extra], target, max_batches, args.probes_per_epoch)
        run["ratio_wall_s"] = run["wall_s"] / tutorial["wall_s"] if tutorial and run["reached"] else None
        return run

    cifarlab = timed([])
    ratio = cifarlab.pop("ratio_wall_s")  # top level in the JSON, as before --also existed
    also = [{**timed(extra.split()), "overrides": extra.split()} for extra in args.also]
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
        "also": also,
    }
    print(f"\n{out['device']}: target test accuracy {target:.4f}")
    if tutorial:
        print(f"tutorial: {tutorial['test_acc']:.4f} after {len(tutorial['epochs'])} epochs, {tutorial['wall_s']:.1f} s")
    runs = [("cifarlab", cifarlab, ratio),
            *((f"cifarlab {' '.join(r['overrides'])}", r, r["ratio_wall_s"]) for r in also)]
    for name, run, run_ratio in runs:
        if run["reached"]:
            hit = next(e for e in run["probes"] if e["epoch"] == run["epoch"])
            print(f"{name}: {hit['test_acc']:.4f} after epoch {run['epoch']:g}, "
                  f"{run['wall_s']:.1f} s" + (f" -> {run_ratio:.3f} of the tutorial's time" if run_ratio else ""))
        else:
            print(f"{name}: did not reach it in {run['max_epochs']} epochs "
                  f"(best {max(e['test_acc'] for e in run['probes']):.4f})")
    benchmark.save(out, args.out)


if __name__ == "__main__":
    main()
