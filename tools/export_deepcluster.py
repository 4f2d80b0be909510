"""Turn any checkpoint this project writes into the file DeepCluster++ loads as its AE_CRC encoder.

    python tools/export_deepcluster.py checkpoints/SSIM/Final_Model_AE_SSIM.pth [Encoders/AE_CRC.pth]

DeepCluster++ reads Encoders/AE_CRC.pth with a strict load_state_dict: a bare float32 state dict with exactly
the AutoEncoder's keys. A periodic checkpoint (Model_AE_epoch_NNN.pth), Model_AE_interrupt.pth, Best_ and
Final_ models, DDP ("module.") or torch.compile ("_orig_mod.") keys and float16 weights are all accepted,
checked the way the evaluation scripts check them, and written atomically.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from Auto_encoder import AutoEncoder  # noqa: E402  (after the path set-up above)
from core import checkpoint_io  # noqa: E402
from core.cli import run_main  # noqa: E402
from core.errors import UserError  # noqa: E402

DEFAULT_OUTPUT = os.path.join("Encoders", "AE_CRC.pth")


def export_deepcluster(source, target=DEFAULT_OUTPUT):
    model = AutoEncoder()
    checkpoint_io.load_weights(model, source)  # every layout, weights-only, shapes and values checked
    state = {key: value.detach().clone() for key, value in model.float().state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    checkpoint_io.save(state, target)
    print(f"wrote {target} ({len(state)} tensors, float32): copy it to DeepCluster++'s Encoders/AE_CRC.pth")


def main():
    if len(sys.argv) not in (2, 3):
        raise UserError("usage: python tools/export_deepcluster.py CHECKPOINT.pth [OUT.pth, default "
                        f"{DEFAULT_OUTPUT}]")
    export_deepcluster(*sys.argv[1:])


if __name__ == "__main__":
    run_main(main)
