#!/usr/bin/env bash
# The tables of README's "Speed" and "Branch-parallel inference" sections, measured on this machine's device
# (DEVICE: cuda if there is one, else cpu), each written to RESULTS (default: this folder) as soon as it is measured.
#
#   bash results/bench/reproduce.sh [TABLE ...]     TABLE: wrn, train-compile, parallel, resnet18 (default: these four),
#                                                   autotune (inference under torch.compile's autotuning modes),
#                                                   train (training, eager and with only the regularisers compiled),
#                                                   loop (the training loop's own cost: WRN-16-1 on 8x8 images, batch 4),
#                                                   finetune (training only: the trees branch after branch and grouped)
#
# Each table's JSON is rewritten after every batch size (or split), so a run cut short keeps what it measured.
set -eu
cd "$(dirname "$0")/../.."
RESULTS=${RESULTS:-results/bench}
DEVICE=${DEVICE:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
REPEATS=${REPEATS:-12}
mkdir -p "$RESULTS"
for table in ${*:-wrn train-compile parallel resnet18}; do
    case $table in
        wrn)            python -m splitnet.bench --device "$DEVICE" --repeats "$REPEATS" --json "$RESULTS/$DEVICE.json" ;;
        train-compile)  python -m splitnet.bench --device "$DEVICE" --skip-inference --train-settings eager,compile \
                            --repeats "$REPEATS" --json "$RESULTS/${DEVICE}_train_compile.json" ;;
        parallel)       python -m splitnet.parallel --device "$DEVICE" --repeats "$REPEATS" \
                            --json "$RESULTS/parallel_$DEVICE.json" ;;
        resnet18)       python -m splitnet.bench --device "$DEVICE" --backbone resnet18 --splits 2-2-2,4-4-4 \
                            --infer-batches 256 --train-batches 128 --settings channels_last,compile \
                            --repeats "$REPEATS" --json "$RESULTS/resnet18_$DEVICE.json" ;;
        train)          python -m splitnet.bench --device "$DEVICE" --skip-inference \
                            --train-settings eager,compile_regularisers --repeats "$REPEATS" \
                            --json "$RESULTS/${DEVICE}_train_regularisers.json" ;;
        loop)           OMP_NUM_THREADS=1 python -m splitnet.bench --device "$DEVICE" --backbone wrn16_1 --image-size 8 \
                            --skip-inference --train-batches 4 --epoch-steps 0 --repeats 150 \
                            --json "$RESULTS/${DEVICE}_loop.json" ;;
        finetune)       python -m splitnet.bench --device "$DEVICE" --skip-inference --repeats "$REPEATS" \
                            --json "$RESULTS/${DEVICE}_train_layouts.json" ;;
        autotune)       python -m splitnet.bench --device "$DEVICE" --skip-train --infer-batches 1024,64 \
                            --settings autotune,autotune_cudagraphs --repeats "$REPEATS" \
                            --json "$RESULTS/${DEVICE}_inference_autotune.json" ;;
        *) echo "unknown table '$table': one of wrn, train-compile, parallel, resnet18, autotune, train, loop, finetune" >&2
           exit 2 ;;
    esac
done
