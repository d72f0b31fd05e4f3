"""The sweep report in TensorBoard: the run <sweep>/report/ holds the table as text and the plots as images; one run
per configuration, report/<configuration>/, holds the mean val/acc and val/loss per epoch over its seeds with a
lower/upper band; a custom_scalars layout draws them (one margin chart per metric, one band per configuration).
TensorBoard itself cannot average runs, so `tensorboard --logdir <sweep>` shows these bands next to the per-run
curves."""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from cifarlab.report import stats
from cifarlab.report.results import Job, Row

METRICS = ("val/acc", "val/loss")
CATEGORY = "seed bands: mean and 95% interval over seeds, per configuration"
# Read scalars only: a job's images and histograms are most of its event files.
ONLY_SCALARS = {"scalars": 0, "images": 1, "histograms": 1, "tensors": 1, "audio": 1, "compressedHistograms": 1}


def history(job: Job) -> dict[str, dict[int, tuple[int, float]]]:
    """{metric: {epoch: (step, value)}} from a finished job's event files (Lightning logs `epoch` at each step)."""
    events = EventAccumulator(str(job.folder), size_guidance=ONLY_SCALARS)
    events.Reload()
    tags = events.Tags()["scalars"]
    epoch_at = {e.step: int(e.value) for e in events.Scalars("epoch")} if "epoch" in tags else None
    out = {}
    for metric in METRICS:
        if metric in tags:
            points = sorted({e.step: e.value for e in events.Scalars(metric)}.items())  # a step logged twice: the last
            if epoch_at is None:  # no epoch scalar (not Lightning's logger): the n-th validation is epoch n
                out[metric] = {i: point for i, point in enumerate(points)}
            else:
                out[metric] = {epoch_at[step]: (step, value) for step, value in points if step in epoch_at}
    return out


def band_tags(metric: str) -> tuple[str, str, str]:
    base = f"seeds/{metric.replace('/', '_')}"
    return base, f"{base}/lower", f"{base}/upper"


def band_run(row: Row) -> str:
    """The folder under report/ of a row's bands: TensorBoard colours by run, so each configuration is its own run."""
    return row.label().replace("/", "_").replace(" ", ",")


def write_bands(report_dir: Path, rows: list[Row]) -> set[str]:
    """Per row, its run report/<configuration>/ with the mean, lower and upper per epoch of its finished seeds, at
    the jobs' own steps (so the bands line up with the per-run curves); returns the metrics that have bands."""
    drawn = set()
    for row in rows:
        per_metric = defaultdict(lambda: defaultdict(list))  # metric -> epoch -> [(step, value) per seed]
        for job in row.finished:
            try:
                curves = history(job)
            except Exception as e:  # noqa: BLE001 - a damaged event file costs its job's band, not the report
                print(f"warning: {job.folder}: event files unreadable ({e}); left out of the bands", file=sys.stderr)
                continue
            for metric, points in curves.items():
                for epoch, point in points.items():
                    per_metric[metric][epoch].append(point)
        if not per_metric:
            continue
        with SummaryWriter(str(report_dir / band_run(row))) as writer:
            for metric, epochs in per_metric.items():
                for epoch, points in sorted(epochs.items()):
                    step = int(statistics.median_low(s for s, _ in points))
                    values = [v for _, v in points]
                    mean, (low, high) = float(np.mean(values)), stats.mean_interval(values)
                    for tag, value in zip(band_tags(metric), (mean, low, high)):
                        writer.add_scalar(tag, mean if np.isnan(value) else value, step)  # one seed: no band
                drawn.add(metric)
    return drawn


def write(sweep: Path, rows: list[Row], text: str, plots: list[Path]) -> None:
    """The report runs, made anew: the events of an earlier report of this sweep would draw every band twice."""
    report_dir = sweep / "report"
    for old in report_dir.glob("**/events.out.tfevents.*"):
        old.unlink()
    with SummaryWriter(str(report_dir)) as writer:
        writer.add_text("sweep/report", text)
        for png in plots:
            writer.add_image(f"sweep/{png.stem}", np.asarray(Image.open(png).convert("RGB")), dataformats="HWC")
        metrics = write_bands(report_dir, rows)
        if metrics:  # one margin chart per metric, drawing the band of every run that has its tags
            writer.add_custom_scalars({CATEGORY: {m: ["Margin", list(band_tags(m))] for m in METRICS if m in metrics}})
