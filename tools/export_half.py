"""Store a trained model's weights as float16 (half the size; loading upcasts them to float32).

    python tools/export_half.py checkpoints/SSIM/Final_Model_AE_SSIM.pth sample_models/model_auto_encoder_reconstruction_ssim.pth

Any checkpoint layout the evaluation scripts load is accepted; the output is a bare state dict.
"""
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core import checkpoint_io  # noqa: E402  (after the path set-up above)
from core.errors import UserError
from core.cli import run_main  # noqa: E402


def export_half(source, target):
    state = checkpoint_io.extract_state_dict(checkpoint_io.load(source), source)
    checkpoint_io.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, target)
    print(f"wrote {target} ({os.path.getsize(target) / 1e6:.1f} MB)")


def main():
    if len(sys.argv) != 3:
        raise UserError("usage: python tools/export_half.py SOURCE.pth TARGET.pth")
    export_half(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    run_main(main)
