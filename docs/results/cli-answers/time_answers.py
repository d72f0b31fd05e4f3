"""Wall time of cifarlab-train's answers before a run (--help, --cfg, a refused override), two checkouts alternating.

    git worktree add /tmp/before <commit>   # e.g. 8bfda1c, before cli.py
    .venv/bin/python docs/results/cli-answers/time_answers.py /tmp/before/src src

Each checkout's src/ is put first on PYTHONPATH and its command line called as `cifarlab-train` calls it (cli.cli where
it exists, train.cli before), from a scratch folder; five rounds, cases and checkouts alternating; prints the medians.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [["--help"], ["--cfg", "job", "model/pool=avg"], ["model.pool.kernel_sizee=3"], ["resume=no/such/run"],
         # refused by config.py: a value (torch builds the layers), a _target_ (Lightning's classes are looked up)
         ["model.pool.kernel_size=4", "model.pool.stride=4", "hydra.run.dir=refused"],
         ["callbacks.epoch_timer._target_=os.system", "hydra.run.dir=refused"],
         # no CIFAR-10 under data.root, and no download: refused by cli.check_data since 2026-12-03, in the run before
         ["data.root=no/such/folder", "data.download=false", "hydra.run.dir=refused"]]
ROUNDS = 5


def command(src: Path) -> str:
    module = "cifarlab.cli" if (src / "cifarlab" / "cli.py").exists() else "cifarlab.train"
    return f"import sys; sys.argv = ['cifarlab-train', *sys.argv[1:]]; from {module} import cli; cli()"


def main() -> None:
    checkouts = [Path(a).resolve() for a in sys.argv[1:]]
    times = {(c, i): [] for c in checkouts for i in range(len(CASES))}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(ROUNDS):
            for i, args in enumerate(CASES):
                for c in checkouts:
                    env = dict(os.environ, PYTHONPATH=str(c))
                    start = time.perf_counter()
                    subprocess.run([sys.executable, "-c", command(c), *args], env=env, cwd=scratch,
                                   capture_output=True)
                    times[(c, i)].append(time.perf_counter() - start)
    print("| answer | " + " | ".join(str(c) for c in checkouts) + " |")
    print("|---|" + "---:|" * len(checkouts))
    for i, args in enumerate(CASES):
        cells = " | ".join(f"{statistics.median(times[(c, i)]):.1f} s" for c in checkouts)
        print(f"| `cifarlab-train {' '.join(args)}` | {cells} |")


if __name__ == "__main__":
    main()
