"""The training tiles as training reads them: the validation split, each process's per-epoch share, and
the loaders, which read the files in the first epoch (keeping each tile when cache_tiles caches them) and
gather later epochs' batches from the cache (tile_cache)."""
import dataclasses
import os

import torch

from core import tile_cache
from core.loaders import loader, stop_loader_workers, worker_count


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


@dataclasses.dataclass
class TrainingData:
    """This process's training tiles as an epoch reads them: its epoch sampler, the training and validation
    loaders (DataLoaders reading the files, or tile_cache.CachedBatches once the cache is complete; no
    validation loader without validation tiles), and the cache the first epoch fills (None without
    cache_tiles, and once complete)."""
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader | tile_cache.CachedBatches
    val_loader: torch.utils.data.DataLoader | tile_cache.CachedBatches | None
    cache: tile_cache.TileCache | None
    train_idx: list[int]
    val_idx: list[int]  # this process's share of the validation tiles
    batch_size: int  # tiles per batch in this process

    def kept(self, batches):
        """batches, their tiles kept in the cache while it is being filled."""
        return batches if self.cache is None else self.cache.record(batches)


def build_loaders(cfg, ddp, dataset, train_idx, val_idx, batch_size, device, say, fill_cache=True):
    """This process's epoch sampler and the loaders reading the files (Dataset.ImageFolder in loader
    processes); with cache_tiles (and fill_cache: epochs are left to train), the cache the first epoch fills
    (read_from_cache)."""
    cache, val_idx = None, val_idx[ddp.rank::ddp.world]
    if fill_cache:  # each process on this node holds its own copy
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ddp.world))
        cache = tile_cache.start_cache(dataset, cfg.cache_tiles, world=local_world, say=say)
    sampler = EpochSampler(torch.utils.data.Subset(dataset, train_idx), cfg.seed, ddp.rank, ddp.world, batch_size)
    workers = worker_count(cfg.num_workers)
    train_loader = loader(torch.utils.data.Subset(dataset, train_idx), batch_size, workers, device,
                          persistent=True, sampler=sampler, drop_last=sampler.num_samples > batch_size)
    val_loader = None
    if val_idx:
        val_loader = loader(torch.utils.data.Subset(dataset, val_idx), batch_size, workers, device, persistent=True)
    return TrainingData(sampler=sampler, loader=train_loader, val_loader=val_loader, cache=cache,
                        train_idx=train_idx, val_idx=val_idx, batch_size=batch_size)


def read_from_cache(data, num_workers, device, say, progress):
    """Once this process has trained an epoch on files, keeping each tile: its loader workers stop, the tiles
    that epoch did not read are decoded, and from now on batches are gathered from the cache (on the GPU when
    they fit there). Returns data with the cache's loaders, and no cache left to fill."""
    stop_loader_workers(data.loader, data.val_loader)
    cached = data.cache.dataset(worker_count(num_workers), progress=progress)
    cached = tile_cache.place(cached, device, say)
    pin = device.type == "cuda"
    train_loader = tile_cache.CachedBatches(cached, data.train_idx, data.batch_size, data.sampler,
                                            drop_last=data.sampler.num_samples > data.batch_size, pin=pin)
    val_loader = (tile_cache.CachedBatches(cached, data.val_idx, data.batch_size, pin=pin)
                  if data.val_idx else None)
    return dataclasses.replace(data, loader=train_loader, val_loader=val_loader, cache=None)
