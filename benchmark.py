"""This project against the reference system's way of doing the same work, measured side by side in one run.

    python benchmark.py              # speed: data, training step, training script, evaluation, features
    python benchmark.py --quality    # reconstruction quality of the two training recipes
    python benchmark.py --slides     # only section 4b: whole slide to features against the encoder alone

The GPU rows run too when torch sees a CUDA GPU. docs/benchmarks.md says what each section measures.
"""
import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import types

import numpy as np
import torch
from PIL import Image

from Auto_encoder import AutoEncoder
from Dataset import find_images, load_image
from core.augmentation import prepare_batch
from benchmarks import ours, quality, reference, tables
from benchmarks import measure
from benchmarks.measure import side_by_side
from core.errors import UserError
from core.cli import run_main
from core.malloc_tuning import keep_freed_memory
from core.devices import autocast_dtype, precision_name

HEADER = ["section", "ours (img/s)", "compared with", "its img/s", "ratio"]
AROUND_HEADER = ["network replaced by a no-op", "device", "num_workers", "tiles/s", "ms per tile"]
# Loader processes of the evaluation and feature runs (sections 3a-4) and of those with the network replaced
# (section 6). A GPU node decodes with several: one process alone is slower than the GPU.
WORKERS = {"cpu": (0, 2), "cuda": (4, 8)}
AROUND_WORKERS = {"cpu": (0, 1, 2), "cuda": (4, 8)}
# Section 4b: one loader process reads the slide on the core the encoder's thread leaves free.
SLIDE_WORKERS = {"cpu": (0, 1, 2), "cuda": (4, 8)}
SAMPLE_SLIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_slides", "cmu_small_region.svs")


def run(tiles, tile, crop, batch, epochs):
    """A training-script run: tiles of tile px in the folder, crop (0 = whole tile), batch, epochs."""
    return types.SimpleNamespace(tiles=tiles, tile=tile, crop=crop, batch=batch, epochs=epochs)


PLANS = {
    # A 256-px batch-16 training step takes seconds on a CPU: 32 tiles (two copies of the 16 sample tiles)
    # for evaluation, and 32-px crops of 64-px tiles for the training script, keep a CPU run to minutes. On a
    # GPU, evaluation runs over 4,096 tiles and the training script at the batches and crops users train with,
    # over 4,096 tiles and enough epochs (several seconds of training) for start-up and epoch ends to count
    # as they do in a real run.
    "full": dict(tile=256, batch=16, slide_stride=128, copies={"cpu": 2, "cuda": 256}, count=None, rounds=2, min_run_time=2.0,
                 scripts={"cpu": [run(800, 64, 32, 32, 5)],
                          "cuda": [run(4096, 256, 128, 256, 10), run(4096, 256, 0, 64, 5)]}),
    "quick": dict(tile=64, batch=4, slide_stride=512, copies={"cpu": 1, "cuda": 1}, count=4, rounds=1, min_run_time=0.0,
                  scripts={"cpu": [run(16, 32, 0, 4, 2)], "cuda": [run(16, 32, 0, 4, 2)]}),
}


# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------
def speedup(section, ours_rate, name, rate):
    return [section, f"{ours_rate:.2f}", name, f"{rate:.2f}", f"{ours_rate / rate:.2f}x"]


def share(section, ours_rate, name, rate):
    return [section, f"{ours_rate:.2f}", name, f"{rate:.2f}", f"{ours_rate / rate:.1%}"]


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------
def data_pipeline(plan, bench):
    """1. A loader worker (one thread) preparing training tiles: the reference's per-image PIL chain against
    our decode (our augmentation runs batched on the device: 1b)."""
    transform = reference.train_transform(plan.tile)
    pillow = pillow_copies(bench.sources, os.path.join(bench.work, "pillow"))

    def each(paths, load):
        return lambda: [load(path) for path in paths], 1
    seconds = side_by_side({"reference": each(bench.paths, lambda path: reference.load(path, transform)),
                            "ours": each(bench.paths, lambda path: load_image(path, plan.tile)),
                            "pillow": each(pillow, lambda path: load_image(path, plan.tile))},
                           plan.rounds, plan.min_run_time)
    rate = {"pillow": len(pillow) / seconds.pop("pillow")} | {k: len(bench.paths) / s for k, s in seconds.items()}
    note = (f"- Section 1 on the same tiles saved by Pillow with its default PNG settings (as tiles from other "
            f"tools usually are): ours {rate['pillow']:.2f} img/s, {rate['pillow'] / rate['reference']:.2f}x the "
            "reference.")
    return [speedup("1. data pipeline per loader worker (1 thread; ours: decode + resize only)", rate["ours"],
                    "reference", rate["reference"])], [note]


def training(plan, bench, device):
    """1b, 2 and 2b. One training step on tiles decoded inside the step, the reference's against ours; and our
    batched augmentation alone, as a share of our step's time."""
    amp_dtype = autocast_dtype(device, plan.precision, training=True)
    paths = [bench.paths[i % len(bench.paths)] for i in range(plan.batch)]
    torch.manual_seed(plan.seed)
    ref_model = reference.network(bench.state, device).train()
    ref_optim = reference.optimizer(ref_model)
    transform = reference.train_transform(plan.tile)
    trainer = ours.Trainer(bench.state, device, amp_dtype, plan.seed)
    images = ours.decode(paths, plan.tile, device)
    generator = torch.Generator().manual_seed(plan.seed)
    works = {
        "reference": (lambda: reference.train_step(ref_model, ref_optim, paths, transform, device), plan.threads),
        "ours": (lambda: trainer.step_on_files(paths, plan.tile), plan.threads),
        "augmentation": (lambda: prepare_batch(images, 0, True, generator), plan.threads),
    }
    # On the CPU the reference also runs as it ships, in a process of its own: malloc, which this process
    # tunes as our scripts do, is process-wide, and half of a 256-px fp32 step can be page faults without it.
    # (On a GPU the tensors live in torch's caching allocator, so malloc does not matter.)
    as_shipped = measure.InChild(dict(state=bench.model_path, paths=paths, tile=plan.tile, threads=plan.threads,
                                      seed=plan.seed, device=str(device))) if device.type == "cpu" else None
    with as_shipped or contextlib.nullcontext():
        seconds = side_by_side({**works, **({"as shipped": as_shipped} if as_shipped else {})},
                               plan.rounds, plan.min_run_time)
    rate = {name: plan.batch / s for name, s in seconds.items()}
    label = f"{plan.tile} px, batch {plan.batch}, {device.type}, ours in {precision_name(amp_dtype)}"
    rows = [share(f"1b. our training step against batched augmentation alone = augmentation's share of the "
                  f"step ({label})", rate["ours"], "augmentation alone", rate["augmentation"])]
    if as_shipped:
        return rows + [
            speedup(f"2. training step, tiles decoded inside it ({label}), each as it runs", rate["ours"],
                    "reference, own process, malloc as shipped", rate["as shipped"]),
            speedup(f"2b. the same, the reference in this process, with our malloc setting ({label})",
                    rate["ours"], "reference, our malloc", rate["reference"])]
    return rows + [speedup(f"2. training step, tiles decoded inside it ({label})", rate["ours"], "reference",
                           rate["reference"])]


def training_script(plan, bench, device):
    """5. The training script by the wall clock (start-up, epoch boundaries, logging, checkpoints included)
    against its bare training step on tiles already on the device, at the same batch, crop and precision."""
    amp_dtype = autocast_dtype(device, plan.precision, training=True)
    rows = []
    for settings in plan.scripts[device.type]:
        folder = bench.script_folders[settings.tiles, settings.tile]
        out = os.path.join(bench.work, f"training_{device.type}_{settings.tile}_{settings.batch}")
        trainer = ours.Trainer(bench.state, device, amp_dtype, plan.seed)
        images = ours.decode(find_images(folder)[:settings.batch], settings.tile, device)
        seconds = side_by_side({
            "script": (lambda: ours.run_training(device, plan.precision, folder, out, settings, plan.seed),
                       plan.threads),
            "step": (lambda: trainer.step(images, settings.crop), plan.threads),
        }, plan.rounds, 4 * plan.min_run_time)  # the step's share of each round nearer the script's
        trained = settings.epochs * (settings.tiles // settings.batch) * settings.batch
        crop = f"{settings.crop}-px crops of " if settings.crop else ""
        rows.append(share(f"5. training script by the wall clock, {settings.epochs} epochs of {settings.tiles} "
                          f"tiles ({crop}{settings.tile} px, batch {settings.batch}, {device.type}, ours in "
                          f"{precision_name(amp_dtype)})", trained / seconds["script"], "bare training step",
                          settings.batch / seconds["step"]))
    return rows


def evaluation(plan, bench, device):
    """3a, 3b and 4. Evaluation end to end (comparison PNGs, workbook) against the reference's and against the
    forward pass alone; feature extraction end to end against the encoder alone."""
    amp_dtype = autocast_dtype(device, plan.precision)
    folder, paths = bench.eval_folders[device.type]
    ref_out = os.path.join(bench.work, f"reference_{device.type}")
    os.makedirs(ref_out)
    ref_seconds = side_by_side({"reference": (lambda: reference.evaluate(bench.model_path, bench.paths, ref_out,
                                                                         plan.tile, device), plan.threads)},
                               1, 0.0)["reference"]
    network = ours.inference_network(bench.state, device)
    tiles = ours.decode(paths, plan.tile, device).contiguous(memory_format=torch.channels_last).float().div_(255)
    works = {"forward": (lambda: ours.forward_all(network, tiles, plan.batch, amp_dtype), plan.threads),
             "encoder": (lambda: ours.forward_all(network.embed, tiles, plan.batch, amp_dtype), plan.threads)}
    for job, engine in (("evaluation", ours.run_evaluation), ("features", ours.run_features)):
        for workers in WORKERS[device.type]:
            out = os.path.join(bench.work, f"{job}_{device.type}_{workers}")
            works[job, workers] = (lambda engine=engine, out=out, workers=workers: engine(
                device, plan.precision, folder, bench.model_path, out, plan.tile, plan.batch, workers), plan.threads)
    rate = {name: len(paths) / s for name, s in side_by_side(works, plan.rounds, plan.min_run_time).items()}
    best = {job: max(WORKERS[device.type], key=lambda workers: rate[job, workers])
            for job in ("evaluation", "features")}
    label = f"{len(paths)} tiles, {device.type}, ours in {precision_name(amp_dtype)}"
    ref_name = "reference" + (f" ({len(bench.paths)} tiles)" if len(bench.paths) != len(paths) else "")
    notes = [f"- {device.type}, {job}: " + ", ".join(f"num_workers={w}: {rate[job, w]:.2f} img/s"
                                                     for w in WORKERS[device.type])
             for job in ("evaluation", "features")]
    return [speedup(f"3a. evaluation end to end ({label}; ours num_workers={best['evaluation']})",
                    rate["evaluation", best["evaluation"]], ref_name, len(bench.paths) / ref_seconds),
            share(f"3b. evaluation end to end against the forward pass alone ({label}; "
                  f"num_workers={best['evaluation']})", rate["evaluation", best["evaluation"]], "forward pass only",
                  rate["forward"]),
            share(f"4. feature extraction end to end against the encoder alone ({label}; "
                  f"num_workers={best['features']})", rate["features", best["features"]], "encoder only",
                  rate["encoder"])], notes


def slide_to_features(plan, bench, device):
    """4b. The slide mode of Extract_Features.py on the shipped sample slide, by its per-slide Seconds
    (tissue mask, tile reads, encoder, thumbnail, .h5), against the encoder alone on the same tiles."""
    amp_dtype = autocast_dtype(device, plan.precision)
    network = ours.inference_network(bench.state, device)
    tiles = ours.slide_tiles(SAMPLE_SLIDE, plan.tile, plan.slide_stride, device)
    tiles = tiles.contiguous(memory_format=torch.channels_last).float().div_(255)
    seconds = {workers: [] for workers in SLIDE_WORKERS[device.type]}

    def slide_run(workers):
        out = tempfile.mkdtemp(prefix=f"slide_{device.type}_{workers}_", dir=bench.work)  # never "already done"
        seconds[workers].append(ours.run_slide_features(device, plan.precision, SAMPLE_SLIDE, bench.model_path, out,
                                                        plan.tile, plan.slide_stride, plan.batch, workers))
    works = {workers: (lambda workers=workers: slide_run(workers), plan.threads) for workers in seconds}
    works["encoder"] = (lambda: ours.forward_all(network.embed, tiles, plan.batch, amp_dtype), plan.threads)
    encoder_rate = len(tiles) / side_by_side(works, plan.rounds, plan.min_run_time)["encoder"]
    # The first call of each work is blocked_autorange's warm-up: its Seconds (imports, first reads) are left out.
    rate = {workers: len(tiles) / statistics.median(times[1:] or times) for workers, times in seconds.items()}
    best = max(rate, key=rate.get)
    label = (f"{len(tiles)} tiles of {plan.tile} px from {os.path.basename(SAMPLE_SLIDE)}, stride {plan.slide_stride}, "
             f"{device.type}, ours in {precision_name(amp_dtype)}; num_workers={best}")
    note = f"- {device.type}, slide to features: " + ", ".join(f"num_workers={w}: {r:.2f} img/s" for w, r in rate.items())
    return [share(f"4b. slide to features by the per-slide Seconds against the encoder alone ({label})", rate[best],
                  "encoder only", encoder_rate)], [note]


def around_the_network(plan, bench, device):
    """6. Evaluation and feature extraction with the network replaced by a no-op: the cost of everything
    around the network (decoding, metrics, PNGs, workbook; CSV, .npy, PCA plot), per tile."""
    folder, paths = bench.eval_folders[device.type]
    works = {}
    for job, engine in (("evaluation", ours.run_evaluation), ("feature extraction", ours.run_features)):
        for workers in AROUND_WORKERS[device.type]:
            out = os.path.join(bench.work, f"no_network_{job[0]}_{device.type}_{workers}")
            works[job, workers] = (lambda engine=engine, out=out, workers=workers: engine(
                device, plan.precision, folder, bench.model_path, out, plan.tile, plan.batch, workers), plan.threads)
    with ours.network_replaced():
        seconds = side_by_side(works, plan.rounds, plan.min_run_time)
    return [[f"6. {job}, {len(paths)} tiles", device.type, str(workers), f"{len(paths) / s:.1f}",
             f"{1000 * s / len(paths):.2f}"] for (job, workers), s in seconds.items()]


# ---------------------------------------------------------------------------------------------------
# Set-up and the run
# ---------------------------------------------------------------------------------------------------
def copies(sources, folder, count):
    """count copies of the source tiles, one subfolder each (as a folder of many tiles); (folder, paths)."""
    for copy in range(count):
        os.makedirs(os.path.join(folder, f"copy_{copy}"))
        for path in sources:
            shutil.copy(path, os.path.join(folder, f"copy_{copy}"))
    return folder, find_images(folder)


def pillow_copies(sources, folder):
    """The source tiles saved again by Pillow with its default PNG settings; their paths."""
    os.makedirs(folder)
    paths = [os.path.join(folder, f"pillow_{i}.png") for i in range(len(sources))]
    for source, path in zip(sources, paths):
        with Image.open(source) as img:
            img.save(path)
    return paths


def cut_tiles(sources, folder, count, size, seed):
    """count tiles of size px cut at random places of the source tiles, saved by Pillow; the folder."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    for i in range(count):
        with Image.open(sources[i % len(sources)]) as img:
            x, y = (int(rng.integers(0, side - size + 1)) for side in img.size)
            img.convert("RGB").crop((x, y, x + size, y + size)).save(os.path.join(folder, f"tile_{i:04d}.png"))
    return folder


def workspace(plan, args, work, devices):
    """Tiles, the model file and the training-script folders of a run, under work."""
    bench = types.SimpleNamespace(work=work, sources=find_images(args.test_folder)[:plan.count])
    bench.eval_folders = {kind: copies(bench.sources, os.path.join(work, f"tiles_{kind}"), plan.copies[kind])
                          for kind in {"cpu", *(device.type for device in devices)}}  # section 1 uses "cpu"
    bench.folder, bench.paths = bench.eval_folders["cpu"]
    torch.manual_seed(args.seed)
    bench.state = AutoEncoder().state_dict()
    bench.model_path = os.path.join(work, "model.pth")
    torch.save(bench.state, bench.model_path)
    bench.script_folders = {}
    for settings in (s for device in devices for s in plan.scripts[device.type]):
        key = settings.tiles, settings.tile
        if key not in bench.script_folders:
            folder = os.path.join(work, f"training_tiles_{settings.tiles}_{settings.tile}")
            bench.script_folders[key] = cut_tiles(bench.sources, folder, settings.tiles, settings.tile, args.seed)
    return bench


def speed(args):
    plan = types.SimpleNamespace(**PLANS["quick" if args.quick else "full"], seed=args.seed,
                                 precision=args.mixed_precision, threads=args.threads, malloc=args.malloc)
    devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
    devices = [device for device in devices if args.devices in ("all", device.type)]
    if not devices:
        raise UserError(f"--devices={args.devices}: torch sees no CUDA GPU here")
    started, load_before = time.perf_counter(), tables.load_average()
    with tempfile.TemporaryDirectory(prefix="benchmark_") as work:
        bench = workspace(plan, args, work, devices)
        print(f"Benchmarking on {len(bench.paths)} tiles ({plan.copies['cpu']} copies of those in "
              f"{args.test_folder}): {'training step' if args.step_only else 'data pipeline'} ...", flush=True)
        only = args.slides or args.step_only
        rows, notes, around = ([], [], []) if only else (*data_pipeline(plan, bench), [])
        for device in devices:
            if not args.slides:
                print(f"  {device.type}: training step ...", flush=True)
                rows += training(plan, bench, device)
            if args.step_only:
                continue
            if not args.slides:
                print(f"  {device.type}: training script ...", flush=True)
                rows += training_script(plan, bench, device)
                print(f"  {device.type}: evaluation and features ...", flush=True)
                evaluation_rows, evaluation_notes = evaluation(plan, bench, device)
                rows, notes = rows + evaluation_rows, notes + evaluation_notes
            print(f"  {device.type}: slide to features ...", flush=True)
            slide_rows, slide_notes = slide_to_features(plan, bench, device)
            rows, notes = rows + slide_rows, notes + slide_notes
            if not args.slides:
                print(f"  {device.type}: evaluation and features with the network replaced ...", flush=True)
                around += around_the_network(plan, bench, device)
    notes = [f"- Wall time {time.perf_counter() - started:.0f} s; {load_before} at the start, "
             f"{tables.load_average()} at the end.",
             f"- malloc set to keep freed memory in this process, as our scripts set it (both sides but row 2's "
             f"reference on the CPU, which runs in a process of its own): {'yes' if plan.malloc else 'no'}.", *notes]
    around_table = [tables.markdown_table(AROUND_HEADER, around)] if around else []  # none with --step_only
    tables.report(args.output, "Benchmark: speed", ["\n".join(tables.machine_lines()),
                                                    tables.markdown_table(HEADER, rows), *around_table,
                                                    "\n".join(notes)])


def parse_args(argv):
    quality_defaults = {"images": 5000, "crop": 128, "train_folder": "training_tiles", "batch": 4, "lr": 1.5e-4,
                        "weight_decay": 3e-4, "augment": False}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the report to this markdown file")
    parser.add_argument("--test_folder", default="input_images", help="held-out tiles (default input_images)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"torch CPU threads (default {torch.get_num_threads()}, torch's choice here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", default="auto",
                        help="our precision, as Config.mixed_precision (default auto); the reference is always fp32")
    parser.add_argument("--devices", choices=("all", "cpu", "cuda"), default="all",
                        help="speed: the devices whose rows run (default all: the CPU, and the GPU when present)")
    parser.add_argument("--quick", action="store_true", help="a few small tiles: checks that everything runs")
    parser.add_argument("--slides", action="store_true", help="speed: only section 4b, whole slide to features")
    parser.add_argument("--step_only", action="store_true",
                        help="speed: only the training step's rows (1b, 2 and 2b), about 1.5 minutes on a 2-core CPU")
    parser.add_argument("--quality", action="store_true", help="train both recipes and compare reconstructions")
    parser.add_argument("--images", type=int, help="quality: training images per recipe (default 5000)")
    parser.add_argument("--crop", type=int, help="quality: training crop side, pixels (default 128)")
    parser.add_argument("--train_folder", help="quality: training tiles (default training_tiles)")
    parser.add_argument("--batch", type=int,
                        help="quality: our batch, the same images in the same order (default 4; the reference's 16)")
    parser.add_argument("--lr", type=float, help="quality: our peak learning rate, cosine-decayed (default 1.5e-4)")
    parser.add_argument("--weight_decay", type=float, help="quality: our Adam weight decay (default 3e-4)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction,
                        help="quality: augment our training batches (default off)")
    args = parser.parse_args(argv)
    given = [f"--{key}" for key in quality_defaults if getattr(args, key) is not None]
    if given and not args.quality:
        parser.error(f"{', '.join(given)} can only be used with --quality")
    if args.quality and (args.slides or args.step_only):
        parser.error("--slides and --step_only are sections of the speed benchmark; leave out --quality")
    if args.slides and args.step_only:
        parser.error("--slides and --step_only are two different sections: give one")
    if args.quality and args.quick:
        parser.error("--quick applies to the speed benchmark; shrink --quality with --images and --crop")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    for key, value in quality_defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main():
    args = parse_args(sys.argv[1:])
    torch.set_num_threads(args.threads)
    autocast_dtype(torch.device("cpu"), args.mixed_precision)  # a bad value stops here, as a one-line error
    # Works in this process get the malloc setting our scripts use (row 2's reference runs in its own).
    args.malloc = keep_freed_memory()
    if args.quality:
        quality.run(args)
    else:
        speed(args)


if __name__ == "__main__":
    run_main(main)
