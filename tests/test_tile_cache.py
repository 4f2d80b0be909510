"""The decoded-tile cache (Config.cache_tiles): same batches as reading files, no file read after the first
pass, and the memory bound that decides whether it is used."""
import os
import pickle

import pytest
import torch

import Dataset
from core import memory
from core import tile_cache
from Dataset import ImageFolder, collate

TILE = 32
COUNT = 24


@pytest.fixture
def folder(tmp_path, make_tiles):
    """COUNT small tiles (one not square, one of another size) and an unreadable file among them."""
    make_tiles(tmp_path, [f"t{index:02d}.png" for index in range(COUNT - 2)], size=TILE)
    make_tiles(tmp_path / "sub", ["big.jpg"], size=2 * TILE)
    (tmp_path / "t06b.png").write_bytes(b"not an image at all")
    return tmp_path


@pytest.fixture
def reads(monkeypatch):
    """Counts the files decoded (Dataset.load_image calls) in this process."""
    calls = []
    real = Dataset.load_image

    def counting(path, tile_size):
        calls.append(path)
        return real(path, tile_size)
    monkeypatch.setattr(Dataset, "load_image", counting)
    return calls


def batches(dataset, epoch):
    """Every batch of one shuffled epoch, as the training loader makes them."""
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(epoch))
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, sampler=sampler, collate_fn=collate)
    return list(loader)


def maybe_cache(dataset, setting, world=1, say=print, workers=0, progress=False):
    """dataset with every tile decoded now (a CachedTiles) when start_cache gives a cache, else dataset."""
    cache = tile_cache.start_cache(dataset, setting, world, say)
    return dataset if cache is None else cache.dataset(workers, progress)


def need(dataset):
    return tile_cache.tile_bytes(len(dataset), dataset.tile_size)


@pytest.mark.parametrize("workers", [0, 2])
def test_same_batches_with_and_without_the_cache(folder, workers, monkeypatch):
    monkeypatch.setattr(tile_cache, "DECODE_BATCH", 5)  # several hand-overs, the bad file inside one
    dataset = ImageFolder(folder, TILE)
    lines = []
    cached = maybe_cache(dataset, True, say=lines.append, workers=workers, progress=False)
    assert isinstance(cached, tile_cache.CachedTiles) and len(cached) == len(dataset) == COUNT
    assert len(lines) == 1 and lines[0].startswith("Caching the decoded tiles in memory (")
    for epoch in (1, 2):
        plain, fast = batches(dataset, epoch), batches(cached, epoch)
        assert len(plain) == len(fast)
        for (images, paths, skipped), (cached_images, cached_paths, cached_skipped) in zip(plain, fast):
            assert cached_images.dtype == torch.uint8 and torch.equal(images, cached_images)
            assert paths == cached_paths and skipped == cached_skipped
    all_skipped = [entry for _, _, skipped in batches(cached, 1) for entry in skipped]
    assert [path for path, _ in all_skipped] == [str(folder / "t06b.png")]
    assert all_skipped[0][1] == dataset[dataset.paths.index(all_skipped[0][0])]["error"]
    copy = pickle.loads(pickle.dumps(cached))  # a spawned loader worker gets the dataset pickled
    for (images, paths, skipped), (copied_images, copied_paths, copied_skipped) in zip(batches(dataset, 3),
                                                                                       batches(copy, 3)):
        assert torch.equal(images, copied_images) and paths == copied_paths and skipped == copied_skipped


def test_no_file_is_read_after_caching(folder, reads):
    dataset = ImageFolder(folder, TILE)
    cached = maybe_cache(dataset, "auto", say=lambda line: None, workers=0, progress=False)
    assert isinstance(cached, tile_cache.CachedTiles)
    assert sorted(reads) == sorted(dataset.paths)  # each file decoded once, the bad one included
    reads.clear()
    for epoch in (1, 2):
        assert sum(len(images) for images, _, _ in batches(cached, epoch)) == COUNT - 1
    assert reads == []
    batches(dataset, 1)
    assert len(reads) == COUNT  # the uncached dataset reads every file each epoch: the counter works


def test_auto_caches_only_within_half_the_available_memory(folder, monkeypatch):
    dataset = ImageFolder(folder, TILE)
    lines = []
    monkeypatch.setattr(tile_cache, "available_memory", lambda: 2 * need(dataset) - 1)
    assert maybe_cache(dataset, "auto", say=lines.append, workers=0, progress=False) is dataset
    assert len(lines) == 1 and lines[0].startswith("Reading tiles from disk every epoch: the decoded tiles (")
    assert "exceed half of the" in lines[0] and "(cache_tiles=auto)" in lines[0]
    monkeypatch.setattr(tile_cache, "available_memory", lambda: 2 * need(dataset))
    cached = maybe_cache(dataset, "auto", say=lines.append, workers=0, progress=False)
    assert isinstance(cached, tile_cache.CachedTiles) and "cache_tiles=auto" in lines[1] and len(lines) == 2


def test_auto_does_not_cache_when_the_memory_is_unknown(folder, monkeypatch):
    dataset = ImageFolder(folder, TILE)
    lines = []
    monkeypatch.setattr(tile_cache, "available_memory", lambda: None)
    assert maybe_cache(dataset, "auto", say=lines.append, workers=0, progress=False) is dataset
    assert lines == ["Reading tiles from disk every epoch: the available memory cannot be read "
                     "(cache_tiles=auto; pass --cache_tiles=true to cache anyway)."]
    cached = maybe_cache(dataset, True, say=lines.append, workers=0, progress=False)
    assert isinstance(cached, tile_cache.CachedTiles) and "available memory unknown" in lines[1]


def test_every_process_on_the_node_counts(folder, monkeypatch):
    dataset = ImageFolder(folder, TILE)
    lines = []
    monkeypatch.setattr(tile_cache, "available_memory", lambda: 3 * need(dataset))
    assert isinstance(maybe_cache(dataset, "auto", world=1, say=lines.append, workers=0,
                                             progress=False), tile_cache.CachedTiles)
    assert maybe_cache(dataset, "auto", world=2, say=lines.append, workers=0, progress=False) is dataset
    assert " x 2 processes" in lines[1] and "exceed half" in lines[1]
    assert isinstance(maybe_cache(dataset, True, world=3, say=lines.append, workers=0,
                                             progress=False), tile_cache.CachedTiles)
    assert maybe_cache(dataset, True, world=4, say=lines.append, workers=0, progress=False) is dataset
    assert lines[3].startswith("cache_tiles=True, but the decoded tiles (") and " x 4 processes" in lines[3]
    assert lines[3].endswith("reading tiles from disk every epoch instead.")


@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory\nmore"), MemoryError()])
def test_true_falls_back_when_the_allocation_fails(folder, monkeypatch, reads, error):
    dataset = ImageFolder(folder, TILE)
    lines = []

    def refuse(*args, **kwargs):
        raise error
    monkeypatch.setattr(tile_cache, "available_memory", lambda: None)
    monkeypatch.setattr(tile_cache.torch, "empty", refuse)
    assert maybe_cache(dataset, True, say=lines.append, workers=0, progress=False) is dataset
    reason = "DefaultCPUAllocator: can't allocate memory" if str(error) else "MemoryError"
    assert lines == [f"cache_tiles=True, but {need(dataset) / 1e6:.1f} MB for the decoded tiles could not be "
                     f"allocated ({reason}): reading tiles from disk every epoch instead."]
    assert reads == []


def test_false_never_caches(folder, monkeypatch, reads):
    dataset = ImageFolder(folder, TILE)
    lines = []
    monkeypatch.setattr(tile_cache, "available_memory", lambda: 1 << 50)
    assert maybe_cache(dataset, False, say=lines.append, workers=0, progress=False) is dataset
    assert lines == ["Reading tiles from disk every epoch (cache_tiles=False)."] and reads == []


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_scheduler_memory_limit_bounds_the_available_memory(tmp_path, monkeypatch):
    root, membership = tmp_path / "cgroup", tmp_path / "membership"
    # cgroup v2: the job's limit sits on an ancestor of the task's own cgroup, which has none.
    write(membership, "0::/job_7/step_0/task_0\n")
    write(root / "job_7" / "memory.max", "1000000\n")
    write(root / "job_7" / "memory.current", "700000\n")
    write(root / "job_7" / "memory.stat", "anon 500000\ninactive_file 50000\nactive_file 150000\n")
    write(root / "job_7" / "step_0" / "task_0" / "memory.max", "max\n")
    write(root / "job_7" / "step_0" / "task_0" / "memory.current", "600000\n")
    assert memory._cgroup_headroom(str(root), str(membership)) == 1000000 - 700000 + 50000
    # cgroup v1, the container's own cgroup mounted as the root (the listed path is the host's)
    write(membership, "4:memory:/host/path/container\n0::/\n")
    write(root / "memory" / "memory.limit_in_bytes", "2000000\n")
    write(root / "memory" / "memory.usage_in_bytes", "1500000\n")
    write(root / "memory" / "memory.stat", "total_inactive_file 100000\n")
    assert memory._cgroup_headroom(str(root), str(membership)) == 600000
    write(root / "memory" / "memory.limit_in_bytes", str(2 ** 63 - 4096))  # v1's "no limit"
    assert memory._cgroup_headroom(str(root), str(membership)) is None
    assert memory._cgroup_headroom(str(root), str(tmp_path / "absent")) is None

    monkeypatch.setattr(memory, "_meminfo_available", lambda: 5000)
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: 3000)
    assert memory.available_memory() == 3000
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: None)
    assert memory.available_memory() == 5000
    monkeypatch.setattr(memory, "_meminfo_available", lambda: None)
    assert memory.available_memory() is None


@pytest.mark.skipif(not os.path.isfile("/proc/meminfo"), reason="the available memory is read from Linux's /proc")
def test_the_available_memory_is_read_on_this_machine():
    with open("/proc/meminfo") as handle:
        total = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemTotal:"))
    available = memory.available_memory()
    assert available is not None and 0 < available <= total


def test_tiles_kept_as_read_then_the_rest_decoded(folder, reads):
    """Training's way: an epoch read from the files (its incomplete last batch dropped) fills the cache as it
    goes; completing it decodes only the files that epoch did not read; later epochs are the same."""
    dataset = ImageFolder(folder, TILE)
    cache = tile_cache.start_cache(dataset, True, say=lambda line: None)
    assert not cache.recorded
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, sampler=sampler, collate_fn=collate, drop_last=True)
    first = list(cache.record(iter(loader)))
    read_first = list(reads)  # the dropped batch is never read
    assert len(first) == COUNT // 5 and len(read_first) == 5 * (COUNT // 5) and cache.recorded
    kept = {path for _, paths, skipped in first for path in paths + [path for path, _ in skipped]}
    reads.clear()
    cached = cache.dataset(workers=0)
    assert sorted(reads) == sorted(set(dataset.paths) - kept) and len(reads) == COUNT - 5 * (COUNT // 5)
    reads.clear()
    for epoch in (2, 3):
        for (images, paths, skipped), (cached_images, cached_paths, cached_skipped) in zip(
                batches(dataset, epoch), batches(cached, epoch)):
            assert torch.equal(images, cached_images) and paths == cached_paths and skipped == cached_skipped
    assert len(reads) == 2 * COUNT  # only the plain dataset read files


@pytest.mark.parametrize("drop_last", [False, True])
def test_cached_batches_are_the_loader_batches(folder, drop_last):
    """Gathered from the cache's tensor, the batches of a subset (the unreadable file among them) are those
    a DataLoader over the same subset, sampler and collate gives."""
    dataset = ImageFolder(folder, TILE)
    cached = maybe_cache(dataset, True, say=lambda line: None, workers=0, progress=False)
    indices = list(range(1, COUNT, 2)) + [dataset.paths.index(str(folder / "t06b.png"))]
    for seed in (1, 2):
        sampler = torch.utils.data.RandomSampler(indices, generator=torch.Generator().manual_seed(seed))
        expected = list(torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=5,
                                                    sampler=sampler, drop_last=drop_last, collate_fn=collate))
        sampler.generator.manual_seed(seed)
        got = list(tile_cache.CachedBatches(cached, indices, 5, sampler, drop_last))
        assert len(got) == len(expected) == len(tile_cache.CachedBatches(cached, indices, 5, sampler, drop_last))
        for (images, paths, skipped), (cached_images, cached_paths, cached_skipped) in zip(expected, got):
            assert torch.equal(images, cached_images) and paths == cached_paths and skipped == cached_skipped
    # The unreadable file is reported once, unless drop_last dropped it with the incomplete last batch.
    sampler.generator.manual_seed(seed)
    position = [indices[i] for i in sampler].index(dataset.paths.index(str(folder / "t06b.png")))
    assert sum(len(skipped) for _, _, skipped in got) == (0 if drop_last and position >= 5 * len(got) else 1)
    sequential = list(tile_cache.CachedBatches(cached, indices, 4))
    assert [path for _, paths, _ in sequential for path in paths] == [
        dataset.paths[i] for i in indices if i != dataset.paths.index(str(folder / "t06b.png"))]


def test_the_cache_stays_in_host_memory_when_the_gpu_has_no_room(folder, monkeypatch):
    dataset = ImageFolder(folder, TILE)
    cached = maybe_cache(dataset, True, say=lambda line: None, workers=0, progress=False)
    lines = []
    assert tile_cache.place(cached, torch.device("cpu"), lines.append) is cached and lines == []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * need(dataset) - 2, 80 << 30))
    placed = tile_cache.place(cached, torch.device("cuda", 0), lines.append)
    assert placed.images.device.type == "cpu" and "stay in host memory" in lines[0] and len(lines) == 1
