"""The one table of Config keys: each key's rule (what it accepts), the scripts that read it and what it
means. Config.py holds the values; the command line's checks and key lists (cli.RULES, cli.SCRIPT_KEYS),
--help and docs/configuration.md (tools/config_doc.py) are all derived from this table, so that a key is
declared once. Importing this module imports no torch: the loss records and the precisions, which live in
modules that do, are read when table() expands it."""
import re
import tokenize
from dataclasses import dataclass, field, replace
from typing import NamedTuple

# The script kinds (cli.load_config's script argument) and their files; {LOSS} is a loss's tag (MSE).
SCRIPTS = {"training": "Training_{LOSS}.py", "evaluation": "Evaluation_{LOSS}.py",
           "features": "Extract_Features.py", "tiles": "Prepare_Tiles.py", "select": "Select_Tiles.py"}


@dataclass(frozen=True)
class Rule:
    """What a Config key accepts. kind: int, float, bool, str, "path" (text that is not empty: an empty path
    would mean the current folder, or a file named ''), "switch" (True, False or "auto") or a tuple of
    choices. Bounds of numbers: low <= value, above < value, value <= high, value < below."""
    kind: object
    low: float = None
    above: float = None
    high: float = None
    below: float = None

    def allowed(self):
        if isinstance(self.kind, tuple):
            return "one of " + ", ".join(repr(choice) for choice in self.kind)
        words = {int: "a whole number (int)", float: "a finite number (float)", bool: "true or false (bool)",
                 str: "text (str, no NUL character)", "path": "a path (text, not empty, no NUL character)",
                 "switch": "'auto', true or false"}[self.kind]
        if self.low is not None and self.high is not None:
            return f"{words} from {self.low} to {self.high}"
        limits = [f"{word} {bound}" for word, bound in (("of at least", self.low), ("above", self.above),
                                                        ("of at most", self.high), ("below", self.below))
                  if bound is not None]
        return " ".join([words, " and ".join(limits)]).strip()


COUNT, TEXT, PATH, FLAG, SWITCH = Rule(int, low=1), Rule(str), Rule("path"), Rule(bool), Rule("switch")
PIXELS = 65536  # largest tile side accepted: far beyond any tile, and clear of the image libraries' C int limits


def _precision_rule():
    """mixed_precision's rule: the precisions core.devices knows (read when the table is expanded, since
    core.devices imports torch)."""
    from core.devices import PRECISIONS
    return Rule(PRECISIONS)


class Also(NamedTuple):
    """Of one loss's key: further scripts that read it (space-separated kinds), and the words its meaning adds."""
    scripts: str
    words: str


@dataclass(frozen=True)
class Setting:
    """One Config key. rule: its Rule (a function giving it, in the table, where it lives in a module that
    imports torch); scripts: the script kinds that read it, in the order docs/configuration.md names them;
    doc: its meaning, markdown (--help shows it as plain text, see plain); modes: {script kind: the mode of
    that script that alone reads it}, named beside the script in the docs. In PER_LOSS, scripts are left
    empty (they are losses.KEY_STEMS's), doc may name the loss as {LOSS}, and also adds, per loss name,
    readers of that loss's key. In table(), loss is the loss whose key it is (None for a shared key)."""
    rule: object
    scripts: tuple
    doc: str
    modes: dict = field(default_factory=dict)
    also: dict = field(default_factory=dict)
    loss: str = None


def _key(rule, scripts, doc, **more):
    """A Setting with scripts given as space-separated kinds."""
    return Setting(rule, tuple(scripts.split()), doc, **more)


SLIDE_MODE = {"features": "slide mode"}  # Extract_Features.py reads the key with folder_path_slides only

# Every Config key besides the per-loss ones, in Config.py's order.
KEYS = {
    # System
    "GPUs": _key(TEXT, "training evaluation features",  # "": the CPU
        'GPU ids: `"0"`, `"2,3"`, or `"cpu"`. Without CUDA the scripts use the CPU and say so once. Training with '
        'several ids starts one process per GPU ([training.md](training.md#several-gpus)).'),
    "num_workers": _key(Rule(int, low=0), "training evaluation features",
        "data-loading processes, at most one per CPU the process may use (0 = load in the main process)"),
    # torch's generators take 64 bits and numpy's legacy seeding 32; the training loop derives per-epoch seeds
    # as seed * 100003 * 64 + ..., which must stay below 2**64. 32 bits leave room for that.
    "seed": _key(Rule(int, low=0, high=2**32 - 1), "training select",
        "random seed for the initial weights, shuffling, augmentation and the validation split; with each "
        "slide's name, the random state of Select_Tiles' k-means and sampling (0 to 2^32 - 1)"),
    "mixed_precision": _key(_precision_rule, "training evaluation features",
        '`"auto"`: bf16 (fp16 without bf16) on GPUs, bf16 for training on CPUs with native bf16, fp32 otherwise; '
        '`"bf16"`; `"fp16"` (CUDA only); `"off"` = fp32 ([training.md](training.md#precision))'),
    "keep_freed_memory": _key(SWITCH, "training evaluation features tiles select",
        "let glibc's malloc keep freed memory for reuse (Linux): `True`, `False`, or `\"auto\"` (on where CUDA "
        "is not available, off where it is) ([training.md](training.md#memory))"),

    # Model training
    "folder_path_train": _key(PATH, "training", "folder of training tiles, searched recursively"),
    "tile_size": _key(Rule(int, low=1, high=PIXELS), "training evaluation features tiles",
        "side in pixels every image is resized to (a multiple of 32)"),
    "train_crop_size": _key(Rule(int, low=0, high=PIXELS), "training",
        "random square crop of each tile for training, in pixels (0 = whole tile; else a multiple of 32 up to "
        "`tile_size`)"),
    "num_epochs": _key(COUNT, "training", "passes over the training tiles"),
    "batch_size_train": _key(COUNT, "training", "tiles per optimisation step, over all processes together"),
    "learning_rate": _key(Rule(float, above=0), "training", "Adam step size"),
    "weight_decay": _key(Rule(float, low=0), "training", "Adam L2 penalty"),
    "l1_loss_weight": _key(Rule(float, low=0), "training",
        "add this times the mean absolute error (L1) to the training loss (0 = the MSE or SSIM loss alone, as "
        "the reference trains; [first_hour.md](first_hour.md) uses it on a CPU)"),
    "lr_schedule": _key(Rule(("constant", "cosine")), "training",
        '`"constant"`, or `"cosine"` (decay to 1 % of `learning_rate` by the last epoch)'),
    "augment": _key(FLAG, "training",
        "random rotation, flips, affine, colour jitter and blur, applied batched on the device "
        "([training.md](training.md#augmentation))"),
    "val_fraction": _key(Rule(float, low=0, below=1), "training",
        "share of training tiles held out for per-epoch validation and the Best model (0 = none)"),
    "sync_batchnorm": _key(FLAG, "training", "several GPUs: synchronise BatchNorm statistics across GPUs"),
    "compile_model": _key(FLAG, "training",
        "`torch.compile` the model (faster on recent GPUs after a slow first epoch)"),
    "cache_tiles": _key(SWITCH, "training",
        'keep the decoded training tiles in host memory (uint8), so that epochs after the first read no file: '
        '`"auto"` when they fit in half the available memory, `True` when they fit in all of it, `False` never '
        '([training.md](training.md#memory))'),
    "finite_check_interval": _key(COUNT, "training",
        "steps between checks that the loss is finite (also at each epoch's end); each check waits for the GPU "
        "once"),
    "save_interval": _key(COUNT, "training",
        "write `Model_AE_epoch_NNN.pth` every N epochs (and at the last epoch)"),
    "keep_checkpoints": _key(Rule(int, low=0), "training",
        "how many of the newest `Model_AE_epoch_NNN.pth` to keep, older ones deleted once a newer one is written "
        "(0 = keep all); Final, Best and the interrupt checkpoint are always kept"),
    "resume": _key(FLAG, "training",
        "continue from the newest checkpoint in the checkpoint folder; `False` starts over, moving the previous "
        "run aside ([training.md](training.md#starting-over))"),

    # Model evaluation
    "folder_path_test": _key(PATH, "evaluation", "folder of tiles to reconstruct, searched recursively"),
    "batch_size_test": _key(COUNT, "evaluation features", "tiles per forward pass"),

    # Cutting a slide into tiles
    "slide_path": _key(PATH, "tiles",
        "whole-slide file (anything OpenSlide opens: SVS, NDPI, MRXS, SCN, pyramidal TIFF ...) or a "
        "PNG/JPEG/TIFF image to cut ([slides.md](slides.md))"),
    "tiles_output_folder": _key(PATH, "tiles", "where the `<slide>_x<X>_y<Y>.png` tiles are written"),
    "tile_stride": _key(Rule(int, low=1, high=PIXELS), "tiles features",
        "pixels at `target_mpp` between neighbouring tile origins (below `tile_size` = overlapping tiles)",
        modes=SLIDE_MODE),
    "target_mpp": _key(Rule(float, above=0, high=1000), "tiles features",
        "microns per pixel of the tiles (0.5 = 20x, 0.25 = 40x); read from the slide's best pyramid level and "
        "resized", modes=SLIDE_MODE),
    "slide_mpp": _key(Rule(float, low=0, high=1000), "tiles features",
        "microns per pixel of the slide at full resolution; 0 = as the file records it (a file that records "
        "none is refused: pass it)", modes=SLIDE_MODE),
    "tissue_fraction": _key(Rule(float, low=0, high=1), "tiles features",
        "keep a tile when at least this fraction of its area is tissue in the slide's tissue mask", modes=SLIDE_MODE),
    "background_gray": _key(Rule(int, low=0, high=255), "tiles features",
        "tissue mask: a pixel whose mean of R, G, B (0-255) is at least this is glass background", modes=SLIDE_MODE),
    "exclude_tiles_in": _key(TEXT, "tiles",  # "": no held-out tiles
        "folder of held-out tiles: the areas of those named `<slide>_x<X>_y<Y>.png` after the slide being cut "
        'are left out (tiles of other slides exclude nothing); `""` = exclude nothing'),

    # Encoder features for DeepCluster++
    "folder_path_features": _key(PATH, "features", "tiles to describe, searched recursively"),
    "features_output": _key(PATH, "features select",
        "CSV `Feature_1..Feature_512,File_Path`; the `.npy`, paths file, PCA plot and skipped list are written "
        "beside it. Select_Tiles reads it when `features_folder` holds no `.h5` file"),
    "folder_path_slides": _key(TEXT, "features",  # "": the tile-folder mode
        'slide mode: one slide, a folder of slides (recursive) or a `.txt` list; `""` = describe the tile folder '
        'above ([slide_features.md](slide_features.md))'),
    "features_folder": _key(PATH, "features select",
        "slide mode writes (and Select_Tiles reads) `<slide>.h5`, `<slide>_tiles.png` (and `<slide>.csv`) per "
        "slide, slide subfolders mirrored, and `slides_summary.csv`"),
    "tile_qc": _key(FLAG, "features",
        "slide mode: also run the decoder and store each tile's reconstruction MSE and SSIM (`qc_mse`, "
        "`qc_ssim`)"),
    "features_csv": _key(FLAG, "features",
        "slide mode: also write `<slide>.csv` (`Feature_1..Feature_512,File_Path`, the path naming the tile "
        "`<slide>_x<X>_y<Y>`)"),

    # Representative tiles per slide
    "selection_folder": _key(PATH, "select",
        "where each slide's table, selected tiles, picture and `selection_summary.csv` are written (the "
        "features' subfolders mirrored)"),
    "select_pca_dims": _key(Rule(int, low=2), "select",
        "principal components kept before k-means (at least 2); slides with no more tiles than this skip PCA"),
    "select_clusters": _key(Rule(int, low=0), "select",
        "k-means clusters per slide; 0 = ceil(sqrt(tiles)); never more than the tiles"),
    "select_distance_groups": _key(COUNT, "select",
        "equal-size groups (sizes differ by at most one) each cluster is split into by distance to its centre"),
    "select_fraction": _key(Rule(float, above=0, high=1), "select",
        "share of each distance group selected, rounded down, at least one tile (above 0, at most 1)"),
    "select_qc": _key(Rule(float, low=0), "select",
        "0 = off; else tiles whose robust z-score of log reconstruction MSE within the slide is beyond ± this "
        "are left out (slide mode with `tile_qc`; 3 is a reasonable value)"),
}

# The per-loss keys, one entry per stem of losses.KEY_STEMS: the key <stem>_<loss name> of every loss
# (model_path_mse, model_path_ssim). The scripts that read them are KEY_STEMS's.
PER_LOSS = {
    "model_saved_location": _key(PATH, "", "folder for {LOSS}-loss checkpoints"),
    "training_loss_file": _key(PATH, "",
        "per-epoch loss log of {LOSS} training; the curve is written beside it as `.png`"),
    "model_path": _key(PATH, "",
        "model evaluated by `Evaluation_{LOSS}.py` (any checkpoint of this project: a training checkpoint, a "
        "Final or Best model, float16 or float32)",
        also={"ssim": Also("features", ", and the encoder `Extract_Features.py` uses")}),
    "recon_output": _key(PATH, "", "folder of the side-by-side PNGs of `Evaluation_{LOSS}.py`"),
    "reconstruction_metrics": _key(PATH, "", "metrics workbook of `Evaluation_{LOSS}.py` (must end in `.xlsx`)"),
}


def _resolved(setting):
    """setting with its rule made: a rule given as a function is called."""
    return setting if isinstance(setting.rule, Rule) else replace(setting, rule=setting.rule())


def table():
    """{Config key: Setting} of every key: KEYS, then PER_LOSS expanded for every loss of losses.RECORDS,
    each with the scripts that read it and its meaning for that loss. ValueError where the table and the
    loss records disagree (a stem of KEY_STEMS without its entry, or the reverse; an unknown loss in also)
    or a script kind is unknown."""
    from core import losses
    stems = {stem: script for script, group in losses.KEY_STEMS.items() for stem in group}
    if set(stems) != set(PER_LOSS):
        raise ValueError(f"core/settings.py PER_LOSS has {sorted(PER_LOSS)}, losses.KEY_STEMS {sorted(stems)}")
    strays = sorted({name for setting in PER_LOSS.values() for name in setting.also} - set(losses.NAMES))
    if strays:
        raise ValueError(f"core/settings.py PER_LOSS: also names {strays[0]!r}, not a loss of losses.RECORDS")
    settings = {key: _resolved(setting) for key, setting in KEYS.items()}
    for stem, setting in PER_LOSS.items():
        for loss in losses.RECORDS:
            also = setting.also.get(loss.name, Also("", ""))
            settings[loss.key(stem)] = replace(_resolved(setting), scripts=(stems[stem], *also.scripts.split()),
                                               doc=setting.doc.format(LOSS=loss.tag) + also.words, also={},
                                               loss=loss.name)
    unknown = sorted({script for setting in settings.values() for script in setting.scripts} - set(SCRIPTS))
    if unknown:
        raise ValueError(f"core/settings.py: unknown script kind {unknown[0]!r}: one of {', '.join(SCRIPTS)}")
    return settings


_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")


def plain(markdown):
    """A meaning as --help shows it: markdown links [text](url) as their text, no backticks."""
    return _LINK.sub(r"\1", markdown).replace("`", "")


def descriptions(path):
    """{key: (section heading, description)} from the source of Config.py: a key's description is the
    trailing # comment on its line, its section the last comment line above it that is not a ruler."""
    described, heading = {}, ""
    with tokenize.open(path) as handle:
        tokens = list(tokenize.generate_tokens(handle.readline))
    for index, token in enumerate(tokens):
        if token.type == tokenize.COMMENT and token.line.lstrip().startswith("#"):
            text = token.string.lstrip("#").strip()
            heading = text if text.strip("-=# ") else heading
        elif (token.type == tokenize.NAME and token.start[1] == 0 and index + 1 < len(tokens)
              and tokens[index + 1].string == "="):
            comment = next((t.string for t in tokens[index:] if t.type in (tokenize.COMMENT, tokenize.NEWLINE)), "")
            described[token.string] = (heading, comment.lstrip("#").strip())
    return described
