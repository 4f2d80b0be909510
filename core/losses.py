"""The training losses, one record each: what training minimises, how validation picks the Best model,
how the loss log plots it, and the Config keys a run of it reads. Adding a loss is a record in RECORDS,
its keys in Config.py, and a Training_<NAME>.py / Evaluation_<NAME>.py script calling the engines."""
import functools
from dataclasses import dataclass

import torch

from core import metrics

# The Config keys every loss has one of, as <stem>_<loss name>, and the scripts that read them.
KEY_STEMS = {"training": ("model_saved_location", "training_loss_file"),
             "evaluation": ("model_path", "recon_output", "reconstruction_metrics")}


@dataclass(frozen=True)
class Loss:
    """name: the loss's word in Config keys and checkpoints (mse); function(output, target): the scalar
    training minimises; val_metric: the validation metric (a key of metrics.per_image) that picks the Best
    model, higher_is_better its direction; plot_label: the y axis of the loss curve."""
    name: str
    function: object
    val_metric: str
    higher_is_better: bool
    plot_label: str

    @property
    def tag(self):
        """The loss in file names and messages: Training_MSE.py, Final_Model_AE_MSE.pth, "MSE loss"."""
        return self.name.upper()

    @property
    def log_column(self):
        """The loss log's column of the validation metric."""
        return f"Val_{self.val_metric}"

    def val_loss(self, value):
        """The validation metric as a loss, lower is better: the Best model's score and the plotted curve."""
        return 1.0 - value if self.higher_is_better else value

    def key(self, stem):
        """This loss's Config key of stem (one of KEY_STEMS): model_path -> model_path_mse."""
        if not any(stem in stems for stems in KEY_STEMS.values()):
            raise ValueError(f"{stem!r} is not a per-loss Config key (see losses.KEY_STEMS)")
        return f"{stem}_{self.name}"

    def keys(self, script=None):
        """The Config keys this loss owns, those script reads when given."""
        stems = KEY_STEMS.get(script, ()) if script else [s for group in KEY_STEMS.values() for s in group]
        return [f"{stem}_{self.name}" for stem in stems]


def _mse(output, target):
    return torch.nn.functional.mse_loss(output.float(), target.float())


def _ssim(output, target):
    return 1.0 - metrics.ssim(output, target)


RECORDS = (
    Loss("mse", _mse, val_metric="MSE", higher_is_better=False, plot_label="MSE loss"),
    Loss("ssim", _ssim, val_metric="SSIM", higher_is_better=True, plot_label="1 - SSIM"),
)
NAMES = tuple(loss.name for loss in RECORDS)
# The function training calls for each loss, looked up when a run starts, so that a test or benchmark can
# put its own in for one run (monkeypatch.setitem(losses.LOSSES, "mse", ...)).
LOSSES = {loss.name: loss.function for loss in RECORDS}


def get(name):
    """The record of the loss called name; ValueError naming the known losses otherwise."""
    for loss in RECORDS:
        if loss.name == name:
            return loss
    raise ValueError(f"unknown loss {name!r}: one of {', '.join(NAMES)} (core/losses.py RECORDS)")


def config_keys():
    """Every per-loss Config key of every loss."""
    return [key for loss in RECORDS for key in loss.keys()]


def training_loss(name, l1_weight=0.0):
    """The function a run minimises for the loss called name: LOSSES[name], plus l1_weight times the mean
    absolute error when that is above 0 (Config.l1_loss_weight). SSIM hardly sees a small shift of colour or
    brightness in bright tissue (its luminance term stays near 1); the L1 term corrects it, and PSNR with it."""
    function = LOSSES[name]
    return functools.partial(_with_l1, function, l1_weight) if l1_weight else function


def _with_l1(function, weight, output, target):
    return function(output, target) + weight * (output.float() - target.float()).abs().mean()
