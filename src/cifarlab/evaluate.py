"""cifarlab-eval: score a run's checkpoint on the test split of a CIFAR-10 folder, with and without test-time views.

    cifarlab-eval outputs/runs/<date>/<run>                     # the checkpoint its own test scored, its own data
    cifarlab-eval                                               # the newest run under outputs/runs/
    cifarlab-eval <run> data.root=/path/to/cifar --checkpoint last
    cifarlab-eval <run> --flips --shift 1                       # these test-time views instead of the run's own

The run's own config decides the model, the normalisation (from the training split of the folder scored) and, unless
--flips/--no-flips/--shift say otherwise, the test-time views (a run that had none is scored with flips and a 1 px
shift as well). Prints the accuracies and writes eval.json into the run folder (eval-2.json, ... when one is there).
It scores in the precision the run tested in (metrics.json's; bf16 autocast where `auto` chose it).
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifarlab.errors import CheckpointError, RunFolderError, UserError, refuse
from cifarlab.run_folder import FINISHED, SAVED_CONFIG, latest, write_json


def checkpoint_file(run_dir: Path, which: str | None) -> Path:
    """best, last, a file path, or by default the checkpoint the run's own test scored (best while it runs)."""
    metrics = json.loads((run_dir / FINISHED).read_text()) if (run_dir / FINISHED).exists() else {}
    which = which or metrics.get("tested_checkpoint") or ("best" if (run_dir / "checkpoints/best.ckpt").exists()
                                                          else "last")
    if which == "best" and metrics.get("best_checkpoint"):  # the file the run's own test named (best-v1.ckpt, ...)
        path = run_dir / metrics["best_checkpoint"]
    else:
        path = run_dir / "checkpoints" / f"{which}.ckpt" if which in ("best", "last") else Path(which)
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {which}: {path}: no such file")
    return path


def run_config(run_dir: Path, data_root: str | None) -> DictConfig:
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: no such folder; give the run folder a run printed as 'logs: <folder>'")
    if not (run_dir / SAVED_CONFIG).is_file():
        raise RunFolderError(f"{run_dir}: not a cifarlab run folder (no {SAVED_CONFIG}); give the folder a run "
                             "printed as 'logs: <folder>'")
    cfg = OmegaConf.load(run_dir / SAVED_CONFIG)
    if data_root is not None:
        cfg.data.root = str(Path(data_root).expanduser().resolve())
    return cfg


def run_precision(run_dir: Path, cfg: DictConfig) -> str:
    """The precision the run tested in: metrics.json's, or for a run that has not finished, what its config picks
    on this machine."""
    from cifarlab import prepare

    metrics = json.loads((run_dir / FINISHED).read_text()) if (run_dir / FINISHED).exists() else {}
    return metrics.get("precision") or prepare.training_precision(str(cfg.trainer.get("precision", "auto")),
                                                                  str(cfg.trainer.accelerator))[0]


def score(cfg: DictConfig, ckpt: Path, flips: bool, shift: int, precision: str) -> dict[str, Any]:
    """Accuracy (and per class) with the views (flips, shift) and on the images alone, of ckpt on cfg's test split:
    Lightning's test loop, in `precision` (a Lightning precision name)."""
    import lightning as L

    from cifarlab import build, checkpoint, prepare  # noqa: F401  prepare filters Lightning's notes
    from cifarlab.data.batches import val_count
    from cifarlab.data.datamodule import CifarDataModule
    from cifarlab.module import CifarModule

    model = build.network(cfg.model)
    checkpoint.load_weights(model, ckpt, str(ckpt))  # a Lightning checkpoint or a state_dict of this architecture
    arrays = prepare.load_data(cfg.data, cfg.data.split_seed)
    dm = CifarDataModule(arrays, val_count(cfg.data.val_size, len(arrays.train_y)), cfg.data.split_seed,
                         cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.normalize, False, 0, cfg.seed)
    module = CifarModule(model, None, channels_last=cfg.channels_last, test_flips=flips, test_shift=shift)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # which accelerators there are: not for this tool
    trainer = L.Trainer(accelerator="auto", devices=1, precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    alone = "_no_tta" if module.tta else ""  # without views, the images alone are all there is

    def per_class(prefix: str) -> dict[str, float]:
        return {c: test[f"{prefix}/{c}"] for c in arrays.classes}

    return {"test_acc": test["test/acc"], "test_acc_no_tta": test[f"test/acc{alone}"],
            "views": {"flips": flips, "shift": shift}, "per_class": per_class("test/acc_class"),
            "per_class_no_tta": per_class(f"test/acc_class{alone}"), "n_test": len(dm.test_y),
            "data_source": arrays.source, "data_root": arrays.root, "device": str(trainer.strategy.root_device),
            "precision": precision}


def views(cfg: DictConfig, flips: bool | None, shift: int | None) -> tuple[bool, int]:
    """The test-time views to score with: those asked for, else the run's own, else (a run that had none) flips and
    a 1 px shift."""
    own = bool(cfg.test_flips) or cfg.test_shift > 0
    return (flips if flips is not None else (bool(cfg.test_flips) if own else True),
            shift if shift is not None else (int(cfg.test_shift) if own else 1))


def free_name(run_dir: Path) -> Path:
    path, n = run_dir / "eval.json", 1
    while path.exists():
        n += 1
        path = run_dir / f"eval-{n}.json"
    return path


def main() -> None:
    p = argparse.ArgumentParser(prog="cifarlab-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, nargs="?", help="a run folder (default: the newest under outputs/runs/)")
    p.add_argument("overrides", nargs="*", metavar="data.root=DIR", help="score on the test split of this folder")
    p.add_argument("--checkpoint", help="best, last or a file (default: the one the run's test scored)")
    p.add_argument("--flips", action=argparse.BooleanOptionalAction, default=None, help="mirror-image views")
    p.add_argument("--shift", type=int, default=None, help="px; views shifted up-left and down-right (0 = none)")
    args = p.parse_args()
    if args.run is not None and "=" in args.run.name:  # `cifarlab-eval data.root=...`: the newest run, another folder
        args.overrides, args.run = [str(args.run), *args.overrides], None
    args.run = args.run or latest("runs/*/*")
    if args.run is None:
        refuse("no run folder under outputs/runs/; give the folder a run printed as 'logs: <folder>'")
    roots = [o.split("=", 1)[1] for o in args.overrides if o.startswith("data.root=")]
    if len(roots) != len(args.overrides):
        refuse(f"{' '.join(o for o in args.overrides if not o.startswith('data.root='))}: cifarlab-eval takes "
               "data.root=<folder> only (the rest comes from the run's config.yaml)")
    if args.shift is not None and not 0 <= args.shift <= 8:
        refuse(f"--shift {args.shift}: must be an int in [0, 8] (px)")
    try:
        cfg = run_config(args.run, roots[-1] if roots else None)
        ckpt = checkpoint_file(args.run, args.checkpoint)  # before the config is read further
        flips, shift = views(cfg, args.flips, args.shift)
        result = score(cfg, ckpt, flips, shift, run_precision(args.run, cfg))
    except UserError as e:
        refuse(str(e), e.exit_status)
    result = {"run": str(args.run), "checkpoint": str(ckpt), **result,
              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = free_name(args.run)
    write_json(out, result)
    print(f"{args.run} ({ckpt.name}) on {result['data_source']}, {result['n_test']:,} test images:")
    print(f"  test/acc {result['test_acc']:.4f} with test-time views (flips={str(flips).lower()}, shift={shift}); "
          f"{result['test_acc_no_tta']:.4f} on the images alone")
    worst = sorted(result["per_class"].items(), key=lambda kv: kv[1])
    print("  per class: " + ", ".join(f"{c} {a:.3f}" for c, a in worst))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
