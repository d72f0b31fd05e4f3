"""The end of a search: the best trial in one line and in search.json, and Optuna's own plots (matplotlib backend)
as PNG files in the sweep folder: optimization history, parameter importances, parallel coordinates, and each
trial's val/acc per epoch (where pruning stopped the losing ones). cifarlab-report puts them into the sweep's report
TensorBoard run with its table (report/summary.py), and the search runs it once at its end."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import matplotlib
import optuna
from optuna.trial import TrialState

from cifarlab.run_folder import write_json
from cifarlab.search.study import FOLDER

log = logging.getLogger("cifarlab")
PLOTS: dict[str, Callable[[optuna.Study], Any]] = {  # file stem -> Optuna's plot (looked up when drawn)
    "search_history": lambda s: optuna.visualization.matplotlib.plot_optimization_history(s),
    "search_importances": lambda s: optuna.visualization.matplotlib.plot_param_importances(s),
    "search_parallel": lambda s: optuna.visualization.matplotlib.plot_parallel_coordinate(s),
    "search_epochs": lambda s: optuna.visualization.matplotlib.plot_intermediate_values(s),
}
RESULTS = "search.json"
AXES = {"search_history": ("trial", "best val/acc of the trial"), "search_epochs": ("epoch", "val/acc")}  # not "step"


def plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Each plot Optuna can draw from the study as it is (importances need two finished trials)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stem, draw in PLOTS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's "experimental" notes; matplotlib's on a one-value axis
            try:
                ax = draw(study)
            except (ValueError, RuntimeError) as e:  # too few finished trials for this plot
                log.info("%s.png not drawn: %s", stem, e)
                continue
        if stem in AXES:
            ax.set_xlabel(AXES[stem][0])
            ax.set_ylabel(AXES[stem][1])
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(9, 5.5)
        fig.tight_layout()
        fig.savefig(folder / f"{stem}.png", dpi=100)
        plt.close(fig)
        written.append(folder / f"{stem}.png")
    return written


def summarize(study: optuna.Study, folder: Path) -> dict[str, Any]:
    """search.json and the plots; the best trial in one line."""
    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if finished else None  # Optuna's own pick, in the study's direction
    result = {"study": study.study_name, "trials": dict(states),
              "best": None if best is None else {"trial": best.number, "value": best.value, "params": best.params,
                                                 "folder": best.user_attrs.get(FOLDER)}}
    write_json(folder / RESULTS, result)
    drawn = plots(study, folder)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    if best is None:
        print(f"search: {counts}; no trial finished, so there is no best yet")
    else:
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
        print(f"search: {counts}; best: trial {best.number} (val/acc {best.value:.4f}) {params}; "
              f"its folder: {folder / str(best.user_attrs.get(FOLDER))}")
    print(f"plots: {', '.join(p.name for p in drawn)} in {folder}")
    return result
