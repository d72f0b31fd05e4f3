#!/usr/bin/env python
"""Training speed of the documented model three ways, in one process, on whatever device is present:

  bare       a plain PyTorch loop over pre-loaded device tensors: the same model, batch size, precision and memory
             format as cifarlab, no augmentation, no Lightning, no logging. The limit.
  bare-fp32  the same loop in float32 (trainer.precision=32-true): what bf16 autocast gains, where `auto` picks it.
  bare-augment  the bare loop fed by cifarlab's own training batches (cropped, flipped and normalised on the device
             as a run's are): bare-augment / bare is what the augmentation leaves of the limit, cifarlab /
             bare-augment what Lightning's loop, logging and the callbacks leave.
  cifarlab   the real pipeline: cifarlab.train.run() with the default config (Lightning, augmentation on the
             device, TensorBoard logging and the inspection callbacks), on the same data.
  cifarlab-fp32  the same pipeline with trainer.precision=32-true: what `auto` gains a user's run.
  tutorial   the seed tutorial's recipe: torchvision.datasets.CIFAR10 with ToTensor, DataLoader(batch_size=64,
             shuffle=True), the usual loop with SGD lr 0.01 (torchvision's md5 check bypassed for stand-in files).

    .venv/bin/python scripts/benchmark.py --data-root data --rounds 3 --out benchmark.json

Each reports training images/s (median over the epochs after the first, which is warm-up), evaluation images/s on
the test set, and peak memory (GPU: torch.cuda.max_memory_allocated per method; CPU: the process's peak resident
size so far, so it only grows), plus the ratios cifarlab / bare and cifarlab / tutorial. --quick trains on a few
batches for a smoke test (tests run it; its speeds mean nothing). --compile adds bare+compile and cifarlab+compile
(torch.compile, whose compile time falls in the warm-up epoch) and their ratios to the eager ones. Overrides after
the options change the model and recipe of bare and cifarlab alike (`experiment=best`: the best recipe's model).
--rounds N runs every method N times in alternating order, for a shared machine whose speed drifts over minutes: the
rates are medians over all rounds, and each round's own ratios are reported beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import cifarlab  # noqa: F401  first: its environment defaults must precede torch's first tensor
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
METHODS = ("bare", "bare-fp32", "bare-augment", "cifarlab", "cifarlab-fp32", "tutorial")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")] \
        if cpuinfo.exists() else []
    return f"CPU: {names[0] if names else platform.machine()}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_mem_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def save(out: dict, path: Path | None) -> None:
    """A measuring tool's results as JSON at --out, when given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"written: {path}")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cifarlab import schema

    schema.register()  # the schema configs/train.yaml extends, and the resolvers it names
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return hydra_compose("train", overrides=overrides)


def evaluate(model: nn.Module, batches, device: torch.device) -> float:
    """Images per second of a no-grad forward pass over the given batches."""
    model.eval()
    n, start = 0, sync(device)
    with torch.no_grad():
        for x, y in batches:
            model(x.to(device, non_blocking=True)).argmax(1)
            n += len(y)
    seconds = sync(device) - start
    model.train()
    return n / seconds


class BareLoop:
    """The bare limit: the configured model, optimizer, loss, precision and memory format over pre-loaded,
    pre-normalised device tensors. No Lightning, no augmentation, no logging: step(idx) is the whole training step."""

    def __init__(self, cfg, arrays, device: torch.device):
        from cifarlab import build, prepare
        from cifarlab.data import batches

        torch.manual_seed(cfg.seed)
        self.memory_format = fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = build.network(cfg.model).to(device, memory_format=fmt)
        if cfg.compile:
            self.model.compile()
        precision = prepare.training_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))[0]
        self.autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast is torch.float16)
        self.optimizer = build.optimizer(cfg.optimizer)(self.model.parameters())
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.norm = norm = batches.Normalize(*batches.channel_stats(arrays.train_x)).to(device)
        self.train_x = norm(arrays.train_x.to(device)).contiguous(memory_format=fmt)  # (N, 3, 32, 32), normalised once
        self.train_y = arrays.train_y.to(device)
        self.test_x = norm(arrays.test_x.to(device)).contiguous(memory_format=fmt)
        self.test_y = arrays.test_y.to(device)
        self.device = device

    def precision(self):
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.precision():
            loss = self.criterion(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def epoch(self, steps: int, batch_size: int) -> float:
        """`steps` training steps over a fresh shuffle of the training set; their wall seconds (the shuffle untimed)."""
        order = torch.randperm(len(self.train_y), device=self.device)
        start = sync(self.device)
        for b in range(steps):
            idx = order[b * batch_size : (b + 1) * batch_size]
            self.step(self.train_x[idx], self.train_y[idx])
        return sync(self.device) - start

    def augmented_epoch(self, batches, steps: int) -> float:
        """`steps` training steps on the first batches of `batches`; their wall seconds, the augmentation included."""
        start = sync(self.device)
        for _, (x, y) in zip(range(steps), batches):
            self.step(x, y)
        return sync(self.device) - start


def bare(cfg, arrays, device: torch.device, epochs: int, max_batches: int | None, augment: bool = False) -> dict:
    """The bare loop's rates; augment: on cifarlab's training batches (DeviceBatches) instead of plain slices."""
    from cifarlab.data.batches import DeviceBatches

    loop = BareLoop(cfg, arrays, device)
    bs = int(cfg.data.batch_size)
    n = len(loop.train_y)
    steps = n // bs if max_batches is None else min(max_batches, n // bs)
    reset_peak(device)
    if augment:
        images = arrays.train_x.to(device).contiguous(memory_format=torch.channels_last)  # as CifarDataModule keeps it

        def training(epoch: int) -> DeviceBatches:
            return DeviceBatches(images, loop.train_y, bs, loop.norm, train=True, seed=int(cfg.seed),
                                 epoch=lambda: epoch, flip=cfg.data.augment.flip,
                                 crop_padding=int(cfg.data.augment.crop_padding), memory_format=loop.memory_format)

        rates = [steps * bs / loop.augmented_epoch(training(e), steps) for e in range(epochs)]
    else:
        rates = [steps * bs / loop.epoch(steps, bs) for _ in range(epochs)]
    eval_bs = int(cfg.data.eval_batch_size)
    n_test = len(loop.test_y) if max_batches is None else min(len(loop.test_y), max_batches * eval_bs)
    test = [(loop.test_x[i : i + eval_bs], loop.test_y[i : i + eval_bs]) for i in range(0, n_test, eval_bs)]
    with loop.precision():
        eval_rate = evaluate(loop.model, test, device)
    return summarize(rates, eval_rate, device, batch_size=bs)


def cifarlab(overrides: list[str], epochs: int, max_batches: int | None, device: torch.device) -> dict:
    from cifarlab import prepare, train

    limits = [] if max_batches is None else [f"trainer.limit_train_batches={max_batches}",
                                              f"trainer.limit_val_batches={max_batches}",
                                              f"trainer.limit_test_batches={max_batches}"]
    cfg = prepare.settle(compose([*overrides, f"trainer.max_epochs={epochs}", *limits]))
    reset_peak(device)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train.run(cfg, Path(tmp))
    return summarize(metrics["train_img_per_s_by_epoch"], metrics["test_img_per_s"], device,
                     batch_size=int(cfg.data.batch_size))


def stand_in_cifar10(root: str, train: bool, transform):
    """torchvision's CIFAR10, without its md5 check (the stand-in files are not byte-identical to the official)."""
    from torchvision.datasets import CIFAR10

    class Unchecked(CIFAR10):
        def _check_integrity(self) -> bool:
            return True

    return Unchecked(root, train=train, transform=transform, download=False)


class Tutorial:
    """The seed tutorial's recipe: its data pipeline, the documented network, SGD lr 0.01, one epoch at a time."""

    def __init__(self, data_root: str, device: torch.device):
        from torch.utils.data import DataLoader
        from torchvision.transforms import ToTensor

        from cifarlab import build

        torch.manual_seed(0)
        root = Path(data_root)
        root = root.parent if root.name == "cifar-10-batches-py" else root
        train_set = stand_in_cifar10(str(root), train=True, transform=ToTensor())
        test_set = stand_in_cifar10(str(root), train=False, transform=ToTensor())
        pin = device.type == "cuda"
        self.train_loader = DataLoader(train_set, batch_size=64, shuffle=True, pin_memory=pin)
        self.test_loader = DataLoader(test_set, batch_size=64, pin_memory=pin)
        self.model = build.network(compose(["experiment=tutorial"]).model).to(device)  # the documented network
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.criterion = nn.CrossEntropyLoss()
        self.device = device

    def epoch(self, max_batches: int | None = None) -> float:
        """Trains one epoch; returns its training images per second."""
        n, start = 0, sync(self.device)
        for b, (x, y) in enumerate(self.train_loader):
            if max_batches is not None and b >= max_batches:
                break
            x, y = x.to(self.device), y.to(self.device)
            loss = self.criterion(self.model(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            n += len(y)
        return n / (sync(self.device) - start)

    def test_batches(self, max_batches: int | None = None) -> list:
        return [b for _, b in zip(range(max_batches or len(self.test_loader)), self.test_loader)]


def accuracy(model: nn.Module, batches, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            total += len(y)
    model.train()
    return correct / total


def tutorial(data_root: str, device: torch.device, epochs: int, max_batches: int | None) -> dict:
    recipe = Tutorial(data_root, device)
    reset_peak(device)
    rates = [recipe.epoch(max_batches) for _ in range(epochs)]
    return summarize(rates, evaluate(recipe.model, recipe.test_batches(max_batches), device), device, batch_size=64)


def summarize(rates: list[float], eval_rate: float, device: torch.device, batch_size: int) -> dict:
    timed = rates[1:] if len(rates) > 1 else rates  # the first epoch is warm-up
    return {
        "train_img_per_s": statistics.median(timed),
        "train_img_per_s_by_epoch": [round(r, 1) for r in rates],
        "eval_img_per_s": eval_rate,
        "peak_mem_mib": peak_mem_mib(device),
        "batch_size": batch_size,
    }


def merge_rounds(rounds: list[dict]) -> dict:
    """One method's summaries from several rounds as one: medians over every round's timed epochs (each round's first
    epoch is its warm-up) and over the rounds' evaluation rates; the first round's peak memory (on a CPU the process's
    high-water mark, which later rounds inherit from every method run before them)."""
    if len(rounds) == 1:
        return rounds[0]
    timed = [r for x in rounds for r in (x["train_img_per_s_by_epoch"][1:] or x["train_img_per_s_by_epoch"])]
    return {
        "train_img_per_s": statistics.median(timed),
        "train_img_per_s_by_epoch": [r for x in rounds for r in x["train_img_per_s_by_epoch"]],
        "eval_img_per_s": statistics.median(x["eval_img_per_s"] for x in rounds),
        "peak_mem_mib": rounds[0]["peak_mem_mib"],
        "batch_size": rounds[0]["batch_size"],
    }


def table(result: dict) -> str:
    rows = ["| method | train img/s | eval img/s | peak memory MiB | batch |", "|---|---:|---:|---:|---:|"]
    for name, r in result["results"].items():
        rows.append(f"| {name} | {r['train_img_per_s']:,.0f} | {r['eval_img_per_s']:,.0f} | {r['peak_mem_mib']:,.0f} "
                    f"| {r['batch_size']} |")
    by_round = result.get("ratios_by_round", {})
    ratios = ", ".join(f"{k} = {v:.3f}" + (f" (rounds: {', '.join(f'{x:.3f}' for x in by_round[k])})" if k in by_round
                                            else "") for k, v in result["ratios"].items())
    ratios = ratios or "(no ratios among the methods run)"
    return "\n".join(rows) + f"\n\n{ratios}\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/ (or that folder itself)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--epochs", type=int, default=4, help="epochs per method; the first is warm-up (default 4)")
    p.add_argument("--quick", action="store_true", help="a few batches per epoch, 2 epochs: a smoke test")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="also measure bare and cifarlab with compile=true (torch.compile), in the same process")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every method this many times, in alternating order (bare, cifarlab, ... then back): on a "
                        "shared machine, speed drifts over minutes; alternating rounds give each method the same drift. "
                        "Rates are medians over all rounds' timed epochs (default 1)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all; the ratios need cifarlab and "
                        "the method it is divided by)")
    p.add_argument("overrides", nargs="*", help="cifarlab config overrides for all three (e.g. data.batch_size=512)")
    args = p.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"--methods {args.methods}: {', '.join(unknown) or 'empty'} unknown; choose from {', '.join(METHODS)}")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be 1 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs, max_batches = (2, 3) if args.quick else (args.epochs, None)

    from cifarlab import prepare

    from cifarlab.data import batches, cifar10

    overrides = [f"data.root={Path(args.data_root).resolve()}", f"threads={torch.get_num_threads()}", *args.overrides]
    cfg = compose(overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arrays = cifar10.load_cifar10(cfg.data.root, download=False)
    n_val = batches.val_count(cfg.data.val_size, len(arrays.train_y))
    arrays.train_x, arrays.train_y = arrays.train_x[n_val:], arrays.train_y[n_val:]  # as many images as cifarlab's

    run = {
        "bare": lambda: bare(cfg, arrays, device, epochs, max_batches),
        "bare-fp32": lambda: bare(compose([*overrides, "trainer.precision=32-true"]), arrays, device, epochs,
                                  max_batches),
        "bare-augment": lambda: bare(cfg, arrays, device, epochs, max_batches, augment=True),
        "cifarlab": lambda: cifarlab(overrides, epochs, max_batches, device),
        "cifarlab-fp32": lambda: cifarlab([*overrides, "trainer.precision=32-true"], epochs, max_batches, device),
        "tutorial": lambda: tutorial(args.data_root, device, epochs, max_batches),
    }
    jobs = {name: run[name] for name in METHODS if name in methods}
    if args.compile:  # does torch.compile pay on this model? Its compile time falls in the warm-up epoch.
        compiled = [*overrides, "compile=true"]
        if "bare" in methods:
            jobs["bare+compile"] = lambda: bare(compose(compiled), arrays, device, epochs, max_batches)
        if "cifarlab" in methods:
            jobs["cifarlab+compile"] = lambda: cifarlab(compiled, epochs, max_batches, device)
    rounds: dict[str, list[dict]] = {name: [] for name in jobs}
    order = [list(jobs) if r % 2 == 0 else list(jobs)[::-1] for r in range(args.rounds)]
    for names in order:
        for name in names:
            rounds[name].append(jobs[name]())
    results = {name: merge_rounds(rs) for name, rs in rounds.items()}
    rate = lambda name: results[name]["train_img_per_s"]  # noqa: E731
    ratios = {f"{a}/{b}": rate(a) / rate(b) for a, b in
              [("cifarlab", "bare"), ("cifarlab", "bare-fp32"), ("bare", "bare-fp32"), ("bare-augment", "bare"),
               ("cifarlab", "bare-augment"), ("cifarlab", "cifarlab-fp32"),
               ("cifarlab", "tutorial"),
               ("bare+compile", "bare"),
               ("cifarlab+compile", "cifarlab")] if a in results and b in results}
    if args.rounds > 1:  # each round's own ratios: how far one round can be trusted on this machine
        for name, r in results.items():
            r["train_img_per_s_by_round"] = [round(x["train_img_per_s"], 1) for x in rounds[name]]
        ratios_by_round = {k: [round(x["train_img_per_s"] / y["train_img_per_s"], 4)
                               for x, y in zip(rounds[k.split("/")[0]], rounds[k.split("/")[1]])] for k in ratios}
    out = {
        "device": device_name(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "torch": torch.__version__,
        "quick": args.quick,
        "epochs": epochs,
        "rounds": args.rounds,
        "data_source": arrays.source,
        "precision": prepare.training_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))[0],
        "channels_last": bool(cfg.channels_last),
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),  # huge CPU pages: cifarlab sets "1"
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),  # numpy's BLAS threads: cifarlab sets "1"
        "compile": bool(cfg.compile),
        "results": results,
        "ratios": ratios,
    }
    if args.rounds > 1:
        out["ratios_by_round"], out["order"] = ratios_by_round, order
    rounds_note = f" in each of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"\n{out['device']}, {out['data_source']}, {epochs} epochs each{rounds_note} (first is warm-up), {out['precision']}, "
          f"channels_last={out['channels_last']}, compile={out['compile']}\n")
    print(table(out))
    save(out, args.out)


if __name__ == "__main__":
    main()
