"""Is an odd first step the one MKL's low-accuracy sqrt would give on one thread's chunk?

    python ep_kernel.py --inputs normal.pt --odd odd.pt --mkl-rt /path/to/libmkl_rt.so.2

normal.pt: first_step.py --save from a run that came out as usual (its inputs are those of every run); odd.pt: the
first conv's weights after the step of a run that did not (first_step.py --save, or a bare tensor). libmkl_rt: from
`pip install --prefix DIR --no-deps mkl==2024.2.0` (the oneMKL torch 2.14.1 is built with), in DIR/lib.

AdamW computes denom = sqrt(exp_avg_sq) / sqrt(1 - beta2) + eps. This redoes the step with the sqrt of the first
thread's chunk (the first half of memory: torch splits this 2,400-element sqrt at its 2,048-element grain) taken
from MKL's vmsSqrt in each instruction set and accuracy mode, and says which reproduces the odd weights bit for bit.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

MODES = {"HA": 0x2, "LA": 0x1, "EP": 0x3}  # | VML_ERRMODE_IGNORE | VML_FTZDAZ_OFF below, as ATen's vml.h calls it

if len(sys.argv) > 1 and sys.argv[1] == "--vml":  # child: vmsSqrt of a .npy, under MKL_ENABLE_INSTRUCTIONS
    import ctypes

    _, _, lib_path, mode, src, dst = sys.argv
    lib = ctypes.CDLL(lib_path)
    lib.vmsSqrt.argtypes = [ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
    a = np.ascontiguousarray(np.load(src), dtype=np.float32)
    r = np.empty_like(a)
    lib.vmsSqrt(a.size, a.ctypes.data, r.ctypes.data, MODES[mode] | 0x100 | 0x00140000)
    np.save(dst, r)
    sys.exit()

parser = argparse.ArgumentParser()
parser.add_argument("--inputs", required=True)
parser.add_argument("--odd", required=True)
parser.add_argument("--mkl-rt", required=True)
args = parser.parse_args()
d = torch.load(args.inputs)
odd = torch.load(args.odd)
odd = odd["after"] if isinstance(odd, dict) else odd
v = d["exp_avg_sq"]  # (32, 3, 5, 5), channels_last
in_memory = v.permute(0, 2, 3, 1).contiguous().flatten()  # (2400,) in memory order
beta1, beta2 = d["betas"]


def step_with(sqrt_in_memory: torch.Tensor) -> torch.Tensor:
    s = sqrt_in_memory.view(32, 5, 5, 3).permute(0, 3, 1, 2)  # back to (32, 3, 5, 5)
    weight = d["before"].clone().mul_(1 - d["lr"] * d["weight_decay"])
    return weight.addcdiv_(d["exp_avg"], (s / (1 - beta2) ** 0.5).add_(d["eps"]), value=-d["lr"] / (1 - beta1))


print("torch's sqrt gives the usual step:", torch.equal(step_with(in_memory.sqrt()), d["after"]))
differ = (odd != d["after"]).permute(0, 2, 3, 1).flatten()
print(f"odd weights: {int(differ.sum())} of 2400 differ, memory positions {int(differ.nonzero().min())}.."
      f"{int(differ.nonzero().max())}")
with tempfile.TemporaryDirectory() as tmp:
    np.save(f"{tmp}/v.npy", in_memory.numpy())
    for isa in ("AVX512", "AVX2"):
        for mode in MODES:
            env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS=isa, MKL_THREADING_LAYER="SEQUENTIAL")
            subprocess.run([sys.executable, __file__, "--vml", args.mkl_rt, mode, f"{tmp}/v.npy", f"{tmp}/s.npy"],
                           env=env, check=True)
            mkl = torch.from_numpy(np.load(f"{tmp}/s.npy"))
            chunk = torch.cat([mkl[:1200], in_memory.sqrt()[1200:]])
            print(f"{isa:6} {mode}: first chunk from it reproduces the odd step: {torch.equal(step_with(chunk), odd)}")
