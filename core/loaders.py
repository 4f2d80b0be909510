"""The one way this project builds a torch DataLoader over tiles: training, validation, evaluation, features
and the tile cache's decoding all read their files through loader()."""
import torch

from core import runtime
from Dataset import collate


def loader(dataset, batch_size, workers, device=None, collate_fn=collate, persistent=False, **options):
    """A DataLoader of dataset in batches of batch_size, read by workers processes (0: in this one). Its
    workers start as runtime.loader_start_method says and leave interrupts to the main process
    (runtime.ignore_interrupts); batches are pinned for a CUDA device; persistent keeps the workers between
    epochs. options: the DataLoader's sampler, drop_last."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn,
        pin_memory=device is not None and device.type == "cuda", persistent_workers=persistent and workers > 0,
        worker_init_fn=runtime.ignore_interrupts if workers else None,
        multiprocessing_context=runtime.loader_start_method() if workers else None, **options)
