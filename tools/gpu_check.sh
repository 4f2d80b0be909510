#!/usr/bin/env bash
# The CUDA paths checked in one command, all output in one log: tests/test_gpu.py, a short training of each
# loss (with a resume) on the GPU, evaluation and feature extraction on the GPU, and benchmark.py.
# Meant to take under 9 minutes on one GPU with 16 CPU cores. Installs nothing from the network.
#
#   bash tools/gpu_check.sh [LOG]                    (default log: gpu_check.log)
#   WHEELS=/path/to/wheels bash tools/gpu_check.sh   (first pip install --no-index the wheels found there)
#
# Without a CUDA GPU it runs all the same, on the CPU (the GPU tests are skipped), as far as that goes.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(realpath -m "${1:-gpu_check.log}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
exec > >(tee "$log") 2>&1

failed=()
step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, note its exit status
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name ($(date +%T), limit ${limit}s)"
    local started=$SECONDS
    timeout --signal=TERM --kill-after=30 "$limit" "$@"
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - started)) s"
    [ "$status" -eq 0 ] || failed+=("$name (exit $status)")
}

echo "gpu_check on $(hostname) at $(date -Is), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "${WHEELS:-}" ]; then
    step "install wheels from $WHEELS" 300 \
        sh -c 'python -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl'
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python - <<'PY'
import os, torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, {os.cpu_count()} CPUs")
if torch.cuda.is_available():
    print(f"GPU 0: {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("No CUDA GPU here: the GPU tests are skipped and everything else runs on the CPU.")
PY

step "tests/test_gpu.py" 240 python -m pytest -q -rs tests/test_gpu.py

# Training tiles: the shipped held-out tiles, copied (training never writes next to them).
mkdir -p "$work/tiles"
cp input_images/*.png "$work/tiles/"
common=(--folder_path_train="$work/tiles" --GPUs=0 --train_crop_size=128 --batch_size_train=8 --save_interval=1
        --num_workers=4 --val_fraction=0.25)
for loss in mse ssim; do
    upper=${loss^^}
    paths=(--model_saved_location_$loss="$work/checkpoints/$upper" --training_loss_file_$loss="$work/loss_$loss.csv")
    step "Training_$upper.py, 2 epochs" 120 python "Training_$upper.py" "${common[@]}" "${paths[@]}" --num_epochs=2
    step "Training_$upper.py, resumed to 3 epochs" 120 \
        python "Training_$upper.py" "${common[@]}" "${paths[@]}" --num_epochs=3
    cat "$work/loss_$loss.csv"
done

step "Evaluation_SSIM.py (sample model)" 120 python Evaluation_SSIM.py --GPUs=0 --num_workers=4 \
    --recon_output_ssim="$work/recon/" --reconstruction_metrics_ssim="$work/metrics_ssim.xlsx"
step "Evaluation_MSE.py (the model just trained)" 120 python Evaluation_MSE.py --GPUs=0 --num_workers=4 \
    --model_path_mse="$work/checkpoints/MSE/Final_Model_AE_MSE.pth" --recon_output_mse="$work/recon_mse/" \
    --reconstruction_metrics_mse="$work/metrics_mse.xlsx"
step "Extract_Features.py (sample model)" 120 python Extract_Features.py --GPUs=0 --num_workers=4 \
    --features_output="$work/features/features.csv"
# The GPU rows where there is a GPU; elsewhere only a quick pass (the full CPU rows take minutes more).
bench=$(python -c "import torch; print('--devices=cuda' if torch.cuda.is_available() else '--quick')")
step "benchmark.py $bench" 360 python benchmark.py "$bench" --output "$work/benchmark_results.md"
[ -f "$work/benchmark_results.md" ] && cat "$work/benchmark_results.md"

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: every step passed ($SECONDS s in all). Log: $log"
else
    echo "gpu_check: ${#failed[@]} step(s) failed ($SECONDS s in all): ${failed[*]}. Log: $log"
    exit 1
fi
