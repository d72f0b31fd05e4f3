#!/usr/bin/env bash
# cifarlab on your NVIDIA GPU, in a few minutes: which GPU torch sees, the training speed there (scripts/benchmark.py,
# briefly: the bare loop against cifarlab's pipeline at batch 256 and 1024), and a short training run on it.
# Run it from the checkout after `make install`:
#
#   scripts/gpu_check.sh                                   # CIFAR-10 from data/, downloaded there if missing
#   CIFARLAB_DATA=/path/to/folder scripts/gpu_check.sh     # a copy you have (holding cifar-10-batches-py/)
#   OUT=outputs/my-gpu scripts/gpu_check.sh                # where the results go
#
# Results go to outputs/gpu-check/<date>_<time>/ unless OUT is set: gpu.txt, benchmark-bs256.json,
# benchmark-bs1024.json, train/ (the run's folder) and gpu_check.log (everything printed). docs/performance.md
# ("On a GPU") has the figures of an H200 to compare with.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
data=${CIFARLAB_DATA:-data}
out=${OUT:-outputs/gpu-check/$(date +%F_%H-%M-%S)}
epochs=3  # per benchmark method and for the training run; the benchmark's first epoch is warm-up

if [ ! -x "$bin/python" ]; then
    echo "error: no $bin/python here: run \`make install\` first (it creates .venv with torch for CUDA)" >&2
    exit 1
fi
mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1
started=$SECONDS

echo "== the GPU torch sees"
"$bin/python" - "$out/gpu.txt" <<'EOF'
import shutil, subprocess, sys
import torch

lines = [f"torch {torch.__version__}, built for CUDA {torch.version.cuda}"]
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    lines.append(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
else:
    lines.append("nvidia-smi: not found (is NVIDIA's driver installed?)")
if not torch.cuda.is_available():
    print("\n".join(lines))
    sys.exit(f"error: torch sees no CUDA GPU. This torch needs an NVIDIA GPU whose driver supports CUDA "
             f"{torch.version.cuda} (CUDA 13: driver 580 or newer); `nvidia-smi` should list the GPU and its driver.")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
v = torch.backends.cudnn.version() or 0
lines.append(f"cuDNN {v // 10000}.{v // 100 % 100}.{v % 100}; trainer.precision=auto trains in "
             f"{'bf16-mixed' if bf16 else '16-mixed (no bf16 on this GPU)'}; cifarlab uses cuda:0")
print("\n".join(lines))
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF

# First, as it downloads CIFAR-10 into data/ when there is no copy; trainer.accelerator=gpu: on the GPU or not at all
echo "== a short training run on the GPU: the documented model, $epochs epochs"
"$bin/cifarlab-train" trainer.accelerator=gpu trainer.max_epochs=$epochs hydra.run.dir="$out/train"

for batch in 256 1024; do
    echo "== the benchmark at batch $batch: the bare loop and cifarlab, $epochs epochs each"
    "$bin/python" scripts/benchmark.py --data-root "$data" --methods bare,cifarlab --epochs $epochs \
        --out "$out/benchmark-bs$batch.json" data.batch_size=$batch
done

cat <<EOF

== done in $((SECONDS - started)) s; everything is in $out/:
  gpu.txt                the GPU, its driver, torch and CUDA
  train/                 the training run: train.log, metrics.json, checkpoints/ and TensorBoard's events
                         (make tensorboard LOGDIR=$out/train)
  benchmark-bs256.json   training img/s of the bare loop and of cifarlab at batch 256, and cifarlab / bare
  benchmark-bs1024.json  the same at batch 1024, where a GPU is busier per step
  gpu_check.log          all of the above as printed
On a GPU, cifarlab trains faster at a larger batch: cifarlab-train data.batch_size=1024 (the learning rate follows).
EOF
