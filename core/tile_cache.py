"""Decoded training tiles kept in memory (Config.cache_tiles), so that epochs after the first read no file.

Every tile is decoded once, into one uint8 N x 3 x H x W tensor: training keeps the tiles of its first
epoch as the loader workers deliver them (TileCache.record), and decodes the few it did not see (the
last incomplete batch; other processes' shares) before the second. The cached dataset then returns the
same items as Dataset.ImageFolder (same tensors, paths and unreadable-file errors), so batches are
identical with and without the cache.

Once complete, the cache moves into GPU memory when it takes at most half of what is free there (place),
and each batch is gathered from it on the GPU (CachedBatches): no loader process, no copy through the host.
Otherwise it stays in ordinary host memory and each batch is gathered into a fresh pinned tensor, which
alone travels to the GPU: pinning the whole cache would lock memory the system cannot reclaim.
"""

import torch
from tqdm import tqdm

from Dataset import in_shared_memory, start_batches
from core.loaders import loader
from core.memory import available_memory

DECODE_BATCH = 32  # tiles per worker hand-over while filling the cache


def tile_bytes(count, tile_size):
    """Bytes of count decoded tiles: 3 x tile_size x tile_size uint8 each."""
    return count * 3 * tile_size * tile_size


class CachedTiles(torch.utils.data.Dataset):
    """An ImageFolder whose tiles are all decoded already: items are views into one uint8 tensor (collate
    copies them out), and unreadable files return the error their decoding gave."""

    def __init__(self, source, images, errors):
        self.folder = getattr(source, "folder", None)
        self.tile_size = source.tile_size
        self.paths = list(source.paths)
        self.images = images
        self.errors = errors

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        error = self.errors.get(index)
        if error is not None:
            return {"image": None, "path": self.paths[index], "error": error}
        return {"image": self.images[index], "path": self.paths[index], "error": None}


def _stack_with_errors(items):
    """collate_fn of the caching loader: (readable images stacked, error or None per item, in order)."""
    good = [item["image"] for item in items if item["image"] is not None]
    stacked = in_shared_memory(torch.stack(good)) if good else None
    return stacked, [item["error"] if item["image"] is None else None for item in items]


def fill(dataset, images, workers, progress=True, indices=None):
    """Decode the items of dataset at indices (default all) into those rows of images (N x 3 x H x W uint8)
    -> {index: error} of unreadable files."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    batches = loader(torch.utils.data.Subset(dataset, indices), DECODE_BATCH, workers, collate_fn=_stack_with_errors)
    errors, start = {}, 0
    with tqdm(total=len(indices), desc="Caching tiles", leave=False, unit="tile", dynamic_ncols=True,
              disable=not progress) as bar:
        for stacked, batch_errors in start_batches(batches):
            rows = indices[start:start + len(batch_errors)]
            readable = [row for row, error in zip(rows, batch_errors) if error is None]
            errors.update((row, error) for row, error in zip(rows, batch_errors) if error is not None)
            if readable:
                images[readable] = stacked
            start += len(batch_errors)
            bar.update(len(batch_errors))
    return errors


class TileCache:
    """The memory for every decoded tile of a dataset, filled as training first reads them (record) and
    completed when the tiles not read yet are decoded (dataset): the first epoch reads its files with the
    loader workers while the network trains, instead of waiting for all of them to be decoded first."""

    def __init__(self, source, images):
        self.source, self.images, self.errors = source, images, {}
        self.rows = {path: row for row, path in enumerate(source.paths)}
        self.kept = torch.zeros(len(source), dtype=torch.bool)

    @property
    def recorded(self):
        return bool(self.kept.any())

    def record(self, batches):
        """The batches ((images, paths, skipped) of Dataset.collate) of a loader over the source, passed on
        after their tiles (and unreadable files' errors) are kept."""
        for images, paths, skipped in batches:
            rows = [self.rows[path] for path in paths]
            if rows:
                self.images[rows] = images
                self.kept[rows] = True
            for path, error in skipped:
                self.errors[self.rows[path]] = error
                self.kept[self.rows[path]] = True
            yield images, paths, skipped

    def dataset(self, workers, progress=True):
        """The cached dataset, once the tiles not recorded are decoded by workers processes."""
        missing = (~self.kept).nonzero().flatten().tolist()
        if missing:
            self.errors.update(fill(self.source, self.images, workers if workers > 1 else 0, progress, missing))
            self.kept[missing] = True
        return CachedTiles(self.source, self.images, self.errors)


def _size(nbytes):
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _decision(setting, need, available, processes):
    """(cache or not, the one line that says why) for Config.cache_tiles."""
    share = f"{_size(need // processes)} x {processes} processes" if processes > 1 else _size(need)
    if setting is False:
        return False, "Reading tiles from disk every epoch (cache_tiles=False)."
    if available is None:
        if setting is True:
            return True, f"Caching the decoded tiles in memory ({share}; cache_tiles=True, available memory unknown)."
        return False, ("Reading tiles from disk every epoch: the available memory cannot be read "
                       "(cache_tiles=auto; pass --cache_tiles=true to cache anyway).")
    bound = available if setting is True else available // 2
    if need <= bound:
        return True, (f"Caching the decoded tiles in memory ({share} of {_size(available)} available, "
                      f"cache_tiles={setting}); epochs after the first read no file.")
    if setting is True:
        return False, (f"cache_tiles=True, but the decoded tiles ({share}) exceed the {_size(available)} of memory "
                       "available: reading tiles from disk every epoch instead.")
    return False, (f"Reading tiles from disk every epoch: the decoded tiles ({share}) exceed half of the "
                   f"{_size(available)} of memory available (cache_tiles=auto).")


def start_cache(dataset, setting, world=1, say=print):
    """A TileCache for dataset (a Dataset.ImageFolder) when Config.cache_tiles (setting: "auto", True or
    False) says so and it fits, else None. world: processes on this node that each hold their own copy.
    Says one line (through say) of what it chose."""
    need = tile_bytes(len(dataset), dataset.tile_size) * world
    cache, line = _decision(setting, need, None if setting is False else available_memory(), world)
    if not cache:
        say(line)
        return None
    shape = (len(dataset), 3, dataset.tile_size, dataset.tile_size)
    try:
        images = torch.empty(shape, dtype=torch.uint8)
    except (RuntimeError, MemoryError) as err:
        say(f"cache_tiles={setting}, but {_size(need // world)} for the decoded tiles could not be allocated "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}): "
            "reading tiles from disk every epoch instead.")
        return None
    say(line)
    return TileCache(dataset, images)


class CachedBatches:
    """The batches of a cached dataset's tiles at indices, gathered from its tile tensor wherever that lives
    (host or GPU memory): the batches DataLoader(Subset(cached, indices), batch_size, sampler, drop_last,
    collate_fn=Dataset.collate) gives, with no loader process and, on a GPU, no copy through the host."""

    def __init__(self, cached, indices, batch_size, sampler=None, drop_last=False, pin=False):
        self.cached, self.indices, self.pin = cached, list(indices), pin
        self.batches = torch.utils.data.BatchSampler(sampler if sampler is not None else range(len(self.indices)),
                                                     batch_size, drop_last)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        images, paths, errors = self.cached.images, self.cached.paths, self.cached.errors
        for positions in self.batches:
            rows = [self.indices[position] for position in positions]
            good = [row for row in rows if row not in errors]
            index = torch.tensor(good, dtype=torch.long)
            if images.is_cuda:  # from pinned memory: the copy does not wait for the GPU
                index = index.pin_memory().to(images.device, non_blocking=True)
            # pin: the batch leaves host memory for a GPU, and only a pinned copy goes there without a wait
            batch = torch.empty((len(good), *images.shape[1:]), dtype=images.dtype, device=images.device,
                                pin_memory=self.pin and not images.is_cuda)
            yield torch.index_select(images, 0, index, out=batch), [paths[row] for row in good], \
                [(paths[row], errors[row]) for row in rows if row in errors]


def place(cached, device, say=print):
    """cached (a CachedTiles) with its tiles moved into the memory of device, a GPU, when they take at most
    half of what is free there; batches are then gathered on the GPU. Says one line of where they are."""
    if device.type != "cuda":
        return cached
    free = torch.cuda.mem_get_info(device)[0]
    need = cached.images.numel()
    if need > free // 2:
        say(f"The decoded tiles ({_size(need)}) stay in host memory: they exceed half of the {_size(free)} free on "
            f"{device}.")
        return cached
    cached.images = cached.images.to(device)
    say(f"Decoded tiles moved to {device} ({_size(need)} of {_size(free)} free): batches are gathered there.")
    return cached
