#!/usr/bin/env bash
# Every run of README's "Results on CIFAR-100" table: WRN-16-8, schedule=fast, one directory per run.
#
#   bash results/cifar100/reproduce.sh [OVERRIDE ...]      e.g. data.root=/data data.download=false
#
# PARALLEL runs share the GPU at a time (default 3). Each run resumes from its own last checkpoint
# (ckpt_path=auto) and a finished run is skipped, so with TIME_LIMIT (seconds for this whole call) the
# same command, called again, goes on where the last call stopped. When every run has its summary.json,
# the summaries are copied unedited to RESULTS (default: this folder) and the report table is printed
# (also written to LOGS/report.csv and report_mean.csv); then every run's final network is timed alone at
# batch 1024 (python -m splitnet.bench --runs, INFER_SETTINGS: default channels_last,compile) into
# RESULTS/inference.json: runs sharing a GPU cannot time themselves, so they skip it (inference_batch=null).
# With COPY_TO, every call ends by copying all run directories but their checkpoints there (summaries,
# pictures, metrics, logs).
set -u
cd "$(dirname "$0")/../.."
LOGS=${LOGS:-logs/cifar100}
RESULTS=${RESULTS:-results/cifar100}
PARALLEL=${PARALLEL:-3}
DEADLINE=$(( $(date +%s) + ${TIME_LIMIT:-31536000} ))
RANDOM_SPLIT="split.assign=random split.gamma1=0 split.gamma2=0 split.gamma3=0"

run() {  # NAME OVERRIDE...: one training, until it ends or the deadline comes
    local name=$1 left
    shift
    [ -f "$LOGS/$name/summary.json" ] && return 0
    left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -gt 30 ] || return 0
    mkdir -p "$LOGS"
    timeout "$left" python train.py schedule=fast ckpt_path=auto inference_batch=null "hydra.run.dir=$LOGS/$name" "$@" \
        >> "$LOGS/$name.out" 2>&1
    echo "$name: exit $? ($(date +%T))"
}
export -f run
export LOGS DEADLINE

RUNS="dense_s0 split=none seed=0
learned_2-2-2_s0 split=2-2-2 seed=0
random_2-2-2_s0 split=2-2-2 $RANDOM_SPLIT seed=0
dense_s1 split=none seed=1
learned_2-2-2_s1 split=2-2-2 seed=1
random_2-2-2_s1 split=2-2-2 $RANDOM_SPLIT seed=1
learned_4-4-4_s0 split=4-4-4 seed=0
learned_1-2-4_s0 split=1-2-4 seed=0
learned_1-1-2_s0 split=1-1-2 seed=0"
xargs -P "$PARALLEL" -I{} bash -c 'run {} "$@"' _ "$@" <<< "$RUNS"

if [ -n "${COPY_TO:-}" ] && [ -d "$LOGS" ]; then  # every run's outputs but its checkpoints, e.g. off a machine soon gone
    mkdir -p "$COPY_TO" && tar -C "$LOGS" --exclude=checkpoints -cf - . | tar -C "$COPY_TO" -xf -
fi
missing=$(while read -r name _; do [ -f "$LOGS/$name/summary.json" ] || echo "$name"; done <<< "$RUNS")
if [ -n "$missing" ]; then
    echo "not finished yet:" $missing "(call again to go on)"
    exit 0
fi
while read -r name _; do cp "$LOGS/$name/summary.json" "$RESULTS/$name.json"; done <<< "$RUNS"
python -m splitnet.report "$LOGS"
python -m splitnet.bench --runs $(while read -r name _; do echo "$LOGS/$name"; done <<< "$RUNS") \
    --infer-batches 1024 --settings "${INFER_SETTINGS:-channels_last,compile}" --json "$RESULTS/inference.json"
