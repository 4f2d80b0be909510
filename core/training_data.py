"""The training tiles as training reads them: the validation split, each process's per-epoch share, and
the loaders, which read the files in the first epoch (keeping each tile when cache_tiles caches them) and
gather later epochs' batches from the cache (tile_cache)."""
import os

import torch

from core import runtime
from core import tile_cache
from core.loaders import loader
from core.runtime import worker_count


def split_indices(count, val_fraction, seed):
    """(training indices, validation indices): a fixed random share of the tiles, chosen by seed."""
    n_val = int(round(count * val_fraction))
    if val_fraction > 0 and n_val == 0 and count >= 2:
        n_val = 1
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (this process's share of a per-epoch shuffle seeded by seed + epoch), minus the
    batches an interrupted epoch had already trained when it is resumed."""

    def __init__(self, dataset, seed, rank, world, batch_size):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.skip = batch_size, 0

    def set_epoch(self, epoch, skip_batches=0):
        super().set_epoch(epoch)
        self.skip = skip_batches * self.batch_size

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return max(0, self.num_samples - self.skip)


def build_loaders(run, dataset, train_idx, val_idx):
    """This process's epoch sampler and the loaders reading the files (Dataset.ImageFolder in loader
    processes); with cache_tiles, the cache the first epoch fills (read_from_cache)."""
    cfg, ddp = run.cfg, run.ddp
    run.cache, run.train_idx, run.val_idx = None, train_idx, val_idx[ddp.rank::ddp.world]
    if run.start_epoch <= cfg.num_epochs:  # each process on this node holds its own copy
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ddp.world))
        run.cache = tile_cache.start_cache(dataset, cfg.cache_tiles, world=local_world, say=run.say)
    run.sampler = EpochSampler(torch.utils.data.Subset(dataset, train_idx), cfg.seed, ddp.rank, ddp.world,
                               run.batch_size)
    workers = worker_count(cfg.num_workers)
    run.loader = loader(torch.utils.data.Subset(dataset, train_idx), run.batch_size, workers, run.device,
                        persistent=True, sampler=run.sampler, drop_last=run.sampler.num_samples > run.batch_size)
    run.val_loader = None
    if run.val_idx:
        run.val_loader = loader(torch.utils.data.Subset(dataset, run.val_idx), run.batch_size, workers, run.device,
                                persistent=True)


def read_from_cache(run):
    """Once this process has trained an epoch on files, keeping each tile: its loader workers stop, the tiles
    that epoch did not read are decoded, and from now on batches are gathered from the cache (on the GPU when
    they fit there)."""
    runtime.stop_loader_workers(run.loader, run.val_loader)
    cached = run.cache.dataset(worker_count(run.cfg.num_workers), progress=run.ddp.main)
    run.cache = None
    cached = tile_cache.place(cached, run.device, run.say)
    pin = run.device.type == "cuda"
    run.loader = tile_cache.CachedBatches(cached, run.train_idx, run.batch_size, run.sampler,
                                          drop_last=run.sampler.num_samples > run.batch_size, pin=pin)
    run.val_loader = tile_cache.CachedBatches(cached, run.val_idx, run.batch_size, pin=pin) if run.val_idx else None


def kept(run, batches):
    """batches, their tiles kept in the cache while it is being filled."""
    return batches if run.cache is None else run.cache.record(batches)
