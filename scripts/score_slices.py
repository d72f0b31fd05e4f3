#!/usr/bin/env python
"""Test accuracy of finished runs' checkpoints on the whole test set and on two slices of it.

    .venv/bin/python scripts/score_slices.py --split 1017 outputs/runs/<date>/<run> [more runs]

Each run's checkpoint (the one its test scored, metrics.json's tested_checkpoint; `--checkpoint best` or `last` picks
checkpoints/best.ckpt or last.ckpt instead) is scored the way the run tested it: its own config (model,
normalisation from its training split, test-time views, memory format), in float32 on the CPU (a run tested in
bf16 on a GPU may differ by an image or two). Figures for test images [0, split), [split, end) and all of them.
Why: the CIFAR-10 stand-in this project is measured on (`cifar10-full`) keeps the official bytes for its first
1,017 test images and decodes the rest from JPEG copies, so the first slice is the figure closest to the official
test set. `--data-root DIR` reads the data from DIR instead of the run's config.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cifarlab import checkpoint, config, data
from cifarlab.module import CifarModule
from cifarlab.train import init_weights, load_data, make_datamodule


def checkpoint_file(run_dir: Path, which: str | None) -> Path:
    """The run's checkpoint to score: `which` (best or last), or by default the one its own test scored."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    which = which or metrics.get("tested_checkpoint", "best")  # runs before test_checkpoint existed tested best
    if which == "last":
        return run_dir / "checkpoints" / checkpoint.LAST
    if metrics.get("best_checkpoint") is None:
        sys.exit(f"{run_dir}: metrics.json names no best checkpoint (best_checkpoint: null)")
    return run_dir / metrics["best_checkpoint"]  # relative to the run folder


def test_hits(cfg, arrays, ckpt: Path, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(N,) 1.0 where the checkpoint's prediction for test image i is right, scored the way the run tests: its model,
    normalisation from its own training split, test-time views and memory format. On a GPU in bf16 autocast, as a run
    there tests (bf16-mixed); on a CPU in float32."""
    datamodule = make_datamodule(cfg, arrays)  # the run's own split and normalisation (its test set is not augmented)
    model = config.build_model(cfg.model)
    init_weights(model, str(ckpt), where=str(ckpt))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    module = CifarModule(model, None, channels_last=cfg.channels_last, test_flips=cfg.test_flips,
                         test_shift=cfg.test_shift).to(device).eval()
    correct = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for x, y in datamodule.test_dataloader():
            correct.append(module.eval_logits(x.to(device)).argmax(1) == y.to(device))
    return torch.cat(correct).float().cpu()


def score(run_dir: Path, split: int, data_root: str | None, which: str | None = None) -> dict:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if data_root is not None:
        cfg.data.root = data_root
    arrays = load_data(cfg.data, cfg.data.split_seed)
    if not 0 < split < len(arrays.test_y):
        sys.exit(f"--split {split}: must be between 1 and {len(arrays.test_y) - 1} (the test set has "
                 f"{len(arrays.test_y)} images)")
    ckpt = checkpoint_file(run_dir, which)
    hit = test_hits(cfg, arrays, ckpt)  # (N,) 1 where the prediction is right
    return {"run": str(run_dir), "checkpoint": ckpt.name, "n": [split, len(hit) - split],
            "test_acc": hit.mean().item(), "first": hit[:split].mean().item(), "rest": hit[split:].mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path,
                        help="finished run folders (config.yaml, metrics.json, checkpoints/)")
    parser.add_argument("--split", type=int, default=1017, help="first test index of the second slice (1017)")
    parser.add_argument("--data-root", help="read the data here instead of the run config's data.root")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--checkpoint", choices=("best", "last"),
                        help="score checkpoints/best.ckpt or last.ckpt (default: the one each run's test scored)")
    args = parser.parse_args()
    for run in args.runs:
        if not all((run / f).is_file() for f in ("config.yaml", "metrics.json")):
            sys.exit(f"{run}: not a finished run folder (needs config.yaml and metrics.json)")
        ckpt = checkpoint_file(run, args.checkpoint)
        if not ckpt.is_file():
            sys.exit(f"{run}: no checkpoint {ckpt.relative_to(run)} to score")
    try:
        rows = [score(run, args.split, args.data_root, args.checkpoint) for run in args.runs]
    except (checkpoint.CheckpointError, config.ConfigError, data.DataError) as e:
        sys.exit(str(e))
    print(f"| run | all test | [0, {args.split}) | [{args.split}, end) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {100 * r['test_acc']:.2f} | {100 * r['first']:.2f} | {100 * r['rest']:.2f} |")
    if len(rows) > 1:
        means = [statistics.mean(r[k] for r in rows) for k in ("test_acc", "first", "rest")]
        print("| mean | " + " | ".join(f"{100 * m:.2f}" for m in means) + " |")
    if args.out:
        args.out.write_text(json.dumps({"split": args.split, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
