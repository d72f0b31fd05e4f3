#!/usr/bin/env bash
# The GPU measurements still to make, prepared as two calls of this workplace's `device` tool (one H200, 15
# minutes of device time a session; docs/performance.md, "The next GPU session: two prepared calls"). That machine
# has torch, Lightning, TensorBoard and torchmetrics but not Hydra, and receives at most 64 MiB a call, so `prepare`
# packs what must travel:
#
#   scripts/device_checks.sh prepare SUBSET FULL   # here, once (5 min): .device/ (git-ignored), 57 + 45 MiB to carry
#   # call 1, carry [".device/deps", ".device/subset", ".device/full1"], timeout_s 420:
#   bash scripts/device_checks.sh speed            #   speed at batch 256 and 1024, of experiment=best, a whole run
#   # call 2 at once (the machine is kept 30 s after a call), carry [".device/deps", ".device/full2"], timeout_s 420:
#   bash scripts/device_checks.sh seeds            #   experiment=best, seeds 0-9, bf16, on all of cifar10-full
#
# SUBSET and FULL are folders holding cifar-10-batches-py/ (the stand-ins cifar10-subset and cifar10-full). Each call
# writes its figures, its log and the machine's description under $OUT (./device-out where OUT is unset), 7 files at
# most, as the tool returns them. A step that fails is logged and the next one runs; each step's time limit is cut
# to what is left of CHECKS_BUDGET seconds (default 400, for a call's timeout_s of 420), and a step with less than
# 20 s left is skipped, so the log always ends before the tool stops the call. CHECKS_QUICK=1 shrinks every step to
# a few batches, to rehearse a call on a CPU (its figures mean nothing); CHECKS_DEPS=0 leaves the carried wheels
# alone, for a Python that has Hydra:
#   CHECKS_QUICK=1 CHECKS_DEPS=0 PYTHON=.venv/bin/python OUT=/tmp/rehearsal bash scripts/device_checks.sh speed
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-}
quick=${CHECKS_QUICK:-0}
budget=${CHECKS_BUDGET:-400}
out=${OUT:-device-out}
py=${PYTHON:-python3}

deps() {  # Hydra, OmegaConf and google-crc32c for the GPU machine's Python 3.12, as constraints.txt pins them
    local pins
    pins=$(grep -E '^(hydra-core|omegaconf)==' constraints.txt)
    rm -rf .device/deps && mkdir -p .device/deps/site
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .device/deps/whl $pins || return 1
    # antlr4-python3-runtime 4.9.3, which Hydra's override parser needs, is published as source only: pure Python,
    # copied from this checkout's environment as it is installed
    cp -r "$(.venv/bin/python -c 'import antlr4, os; print(os.path.dirname(antlr4.__file__))')" .device/deps/site/
}

setup() {  # there: the carried packages beside the machine's own, and this checkout's src/ and scripts/
    if [ -d .device/deps/whl ] && [ "${CHECKS_DEPS:-1}" = 1 ]; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .device/deps/whl/*.whl || exit 1
        cp -r .device/deps/site/. /tmp/site/
        export PYTHONPATH=/tmp/site:$PWD/src:$PWD/scripts
    else
        export PYTHONPATH=$PWD/src:$PWD/scripts
    fi
    export PYTHONUNBUFFERED=1
    mkdir -p "$out"
}

machine() {  # what the figures were measured on
    echo "== $stage $(date -u +%FT%TZ) on $(hostname); quick=$quick, budget ${budget} s"
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU"
      grep -m1 'model name' /proc/cpuinfo; nproc
      "$py" -c 'import sys, torch, lightning, hydra; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "lightning", lightning.__version__,
"hydra", hydra.__version__)'
      git log -1 --format='commit %h %s' 2>/dev/null; } > "$out/$stage-machine.txt" 2>&1
    cat "$out/$stage-machine.txt"
}

step() {  # step NAME LIMIT_S COMMAND...: run it within what is left of the budget, log how long it took, go on
    local name=$1 limit=$2 started=$SECONDS left=$((budget - SECONDS - 10))
    shift 2
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, ${left} s of the budget left: $*" >&2
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (at most $limit s): $*" >&2  # to the log, also when the step's output goes to a file of its own
    timeout "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - started)) s" >&2
}

speed() {
    if [ "$quick" = 1 ]; then rep=(--train 4096 --test 1024); bench=(--quick); else
        rep=(--train 50000 --test 10000); bench=(--epochs 4); fi
    step unpack 120 "$py" scripts/webp_parts.py unpack /tmp/subset .device/subset/part1
    rm -rf /tmp/rep  # a call run again on the same machine: repeat_dataset.py writes only into a new folder
    step repeat 120 "$py" scripts/repeat_dataset.py /tmp/subset /tmp/rep "${rep[@]}"
    # kept on the machine for call 2, which brings the other half
    [ -d .device/full1 ] && rm -rf /tmp/full1 && cp -r .device/full1 /tmp/full1
    # cifarlab (Lightning's own loop) / bare at the default batch 256 and at 1024, over alternating rounds; where a
    # step's time goes at 256; then experiment=best (its max-blur pooling) at its own batch size, 128
    step bench-256 150 "$py" scripts/benchmark.py "${bench[@]}" --data-root /tmp/rep --methods bare,cifarlab \
        --rounds 3 --out "$out/benchmark-gpu-bs256-rounds.json"
    step profile-256 100 "$py" scripts/profile_step.py --data-root /tmp/rep callbacks=plain > "$out/profile-gpu.txt"
    step bench-1024 150 "$py" scripts/benchmark.py "${bench[@]}" --data-root /tmp/rep --methods bare,cifarlab \
        --rounds 3 data.batch_size=1024 --out "$out/benchmark-gpu-bs1024-rounds.json"
    step bench-best 150 "$py" scripts/benchmark.py "${bench[@]}" --data-root /tmp/rep --methods bare,cifarlab \
        --rounds 2 experiment=best --out "$out/benchmark-gpu-best-blurmax.json"
    # last, skipped if the budget is short: a whole default run there (its wall time is the step's), and Lightning's
    # SimpleProfiler means for the inspection's host work between epochs (docs/results/inspection-png/), into the log
    run=(trainer.max_epochs=3)
    [ "$quick" = 1 ] && run=(trainer.max_epochs=1 trainer.limit_train_batches=2)
    rows='PoolingImages\.on_train_(start|epoch_end) |WeightHistograms\.on_train_epoch_end |'
    rows+='EvaluationFigures\.on_test_epoch_end |run_training_epoch |^test/acc'
    step inspection 90 bash -c 'rm -rf /tmp/inspection; set -o pipefail
        "$0" -m cifarlab.cli data.root=/tmp/rep hydra.run.dir=/tmp/inspection +trainer.profiler=simple "${@:2}" 2>&1 |
        grep -E "$1" | tr -s " \t" " " | sort -u' "$py" "$rows" "${run[@]}"
}

seeds() {
    if [ ! -d /tmp/full1 ]; then
        echo "error: /tmp/full1 is gone: the machine was given back after call 1; run speed again (or carry"
        echo "       .device/full1 with this call and copy it to /tmp/full1 first)"
        return 3
    fi
    step unpack 120 "$py" scripts/webp_parts.py unpack /tmp/full /tmp/full1 .device/full2
    if [ "$quick" = 1 ]; then
        extra="trainer.max_epochs=1 trainer.limit_train_batches=2 trainer.limit_val_batches=1"; seeds=0-1; jobs=2
    else
        extra=""; seeds=0-9; jobs=10
    fi
    # No run starts after the deadline, and those still running 20 s after it are stopped; then the runs are scored.
    local deadline=${CHECKS_DEADLINE:-$((budget - SECONDS - 70))}
    # ten bf16 runs of experiment=best (max-blur pooling) at once: a run is bound by its host's Python, not the GPU
    step trials $((deadline + 60)) "$py" scripts/recipe_trials.py --data-root /tmp/full --runs /tmp/trials \
        --out "$out/trials-best-h200.jsonl" --jobs "$jobs" --seeds "$seeds" --deadline "$deadline" --extra "$extra" base
}

case $stage in
prepare)
    subset=${2:?give SUBSET, a folder holding cifar-10-batches-py/}
    full=${3:?give FULL, a folder holding cifar-10-batches-py/}
    deps || { echo "error: could not download the wheels Hydra needs there"; exit 1; }
    rm -rf .device/subset .device/full .device/full1 .device/full2
    .venv/bin/python scripts/webp_parts.py pack "$subset" .device/subset --parts 1 || exit 1
    .venv/bin/python scripts/webp_parts.py pack "$full" .device/full --parts 2 || exit 1
    mv .device/full/part1 .device/full1 && mv .device/full/part2 .device/full2 && rmdir .device/full
    du -sh .device/*
    ;;
speed | seeds)
    setup
    { machine; "$stage"; } 2>&1 | tee -a "$out/$stage.log"  # waited for: the log is whole when the call ends
    ;;
*)
    echo "usage: scripts/device_checks.sh prepare SUBSET FULL | speed | seeds   (see the top of this file)"
    exit 2
    ;;
esac
