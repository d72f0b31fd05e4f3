"""AdamW's first step in the run of tests/test_resume.py (synthetic data, RReLU, dropout, 2 threads).

Prints a hash of the first conv's weights after that step; with --save FILE, also writes the step's inputs and
result. --no-resolve skips train.resolve_vml_kernels, as the code before it did. Run from the repository root:

    for i in $(seq 30); do .venv/bin/python docs/results/vml-first-call/first_step.py --no-resolve; done |
        sort | uniq -c
"""

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from conftest import compose_config  # noqa: E402

from cifarlab import train  # noqa: E402

RUN = ["data=synthetic", "data.n_train=3000", "data.batch_size=128", "trainer.max_epochs=1", "threads=2",
       "trainer.log_every_n_steps=1", "model/dropout=dropout", "model/activation=rrelu", "callbacks=plain"]

parser = argparse.ArgumentParser()
parser.add_argument("--no-resolve", action="store_true")
parser.add_argument("--save")
args = parser.parse_args()
if args.no_resolve:
    train.resolve_vml_kernels = lambda: None
first_step = torch.optim.AdamW.step
done = []


def step(self, *a, **k):
    if done:
        return first_step(self, *a, **k)
    done.append(True)
    group = self.param_groups[0]
    weight = group["params"][0]  # the first conv's, (32, 3, 5, 5) channels_last
    before, grad = weight.detach().clone(), weight.grad.clone()
    out = first_step(self, *a, **k)
    digest = hashlib.sha1(weight.detach().numpy().tobytes()).hexdigest()[:8]
    print(f"{'unresolved' if args.no_resolve else 'resolved'} {digest}", flush=True)
    if args.save:
        state = self.state[weight]
        torch.save({"before": before, "grad": grad, "after": weight.detach().clone(), "lr": group["lr"],
                    "weight_decay": group["weight_decay"], "eps": group["eps"], "betas": group["betas"],
                    "exp_avg": state["exp_avg"].clone(), "exp_avg_sq": state["exp_avg_sq"].clone()}, args.save)
    return out


torch.optim.AdamW.step = step
with tempfile.TemporaryDirectory() as d:
    train.train(train.settle(compose_config(*RUN)), Path(d))
