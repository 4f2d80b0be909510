#!/usr/bin/env bash
# Does bf16 mixed precision train as well as fp32? Two MSE trainings from the same initial weights on the
# same batches, differing only in --mixed_precision, then both models evaluated in fp32 on input_images.
#
#   bash tools/precision_check.sh [EPOCHS] [OUT_DIR]      (defaults: 120 epochs, precision_check/)
#
# Needs training_tiles/ (python Prepare_Tiles.py ...). The two runs share the CPU, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-120}
out=${2:-precision_check}
mkdir -p "$out"
common=(--folder_path_train=training_tiles --train_crop_size=64 --batch_size_train=16 --augment=False
        --learning_rate=3e-4 --lr_schedule=cosine --num_epochs="$epochs" --num_workers=0 --save_interval=20
        --resume=False --GPUs=cpu)
for precision in off bf16; do
    OMP_NUM_THREADS=1 python Training_MSE.py "${common[@]}" --mixed_precision="$precision" \
        --model_saved_location_mse="$out/$precision" --training_loss_file_mse="$out/loss_$precision.csv" \
        > "$out/train_$precision.log" 2>&1 &
done
wait
for precision in off bf16; do
    python Evaluation_MSE.py --mixed_precision=off --GPUs=cpu --num_workers=0 \
        --model_path_mse="$out/$precision/Final_Model_AE_MSE.pth" --recon_output_mse="$out/recon_$precision/" \
        --reconstruction_metrics_mse="$out/metrics_$precision.xlsx" | tail -4 | sed "s/^/[trained $precision] /"
done
python - "$out" <<'PY'
import sys, pandas as pd
out = sys.argv[1]
for precision in ("off", "bf16"):
    log = pd.read_csv(f"{out}/loss_{precision}.csv")
    last = log.iloc[-1]
    print(f"{precision:>4}: final training loss {last['Loss']:.6f}, validation PSNR {last['Val_PSNR']:.2f} dB, "
          f"SSIM {last['Val_SSIM']:.4f}, {log['Seconds'].sum():.0f} s of training")
PY
