"""How much memory this process can still take: the host's available memory, bounded by the memory
cgroups that hold it (a scheduler's job limit, a container's), in bytes."""
import os

NO_LIMIT = 2 ** 60  # cgroup v1 writes "no limit" as a number near 2**63


def _read_number(path):
    try:
        with open(path) as file:
            text = file.read().strip()
    except (OSError, ValueError):
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available():
    """MemAvailable of /proc/meminfo in bytes (Linux), else free pages x page size, else None."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _cgroup_folders(root, membership):
    """The memory cgroup folders that hold this process (its own and every ancestor), v2 and v1 layouts.
    membership: the lines of /proc/self/cgroup."""
    folders = []
    for line in membership:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        base = {"": root, "memory": os.path.join(root, "memory")}.get(controllers)
        if base is None:
            continue
        here = os.path.join(base, path.lstrip("/"))
        if not os.path.isdir(here):  # a container shows the host's path but mounts its own cgroup as the root
            here = base
        while True:
            folders.append(here)
            if os.path.normpath(here) == os.path.normpath(base):
                break
            here = os.path.dirname(here)
    return folders


def _cgroup_headroom(root="/sys/fs/cgroup", membership_file="/proc/self/cgroup"):
    """The least memory any of this process's cgroups (a scheduler's job limit) can still grant, or None.
    Page cache that the cgroup can drop (inactive file pages) counts as free, as the kernel treats it."""
    try:
        with open(membership_file) as file:
            membership = file.read().splitlines()
    except OSError:  # not Linux
        return None
    headrooms = []
    for folder in _cgroup_folders(root, membership):
        for limit_name, usage_name, cache_key in (("memory.max", "memory.current", "inactive_file"),
                                                  ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                   "total_inactive_file")):
            limit = _read_number(os.path.join(folder, limit_name))
            usage = _read_number(os.path.join(folder, usage_name))
            if limit is None or usage is None or limit >= NO_LIMIT:
                continue
            reclaimable = 0
            try:
                with open(os.path.join(folder, "memory.stat")) as file:
                    stats = dict(line.split()[:2] for line in file if len(line.split()) >= 2)
                reclaimable = int(stats.get(cache_key, 0))
            except (OSError, ValueError):
                pass
            headrooms.append(max(0, limit - usage + reclaimable))
    return min(headrooms) if headrooms else None


def available_memory():
    """Bytes this process can still allocate without swapping or meeting its scheduler's limit, or None
    where that cannot be read."""
    known = [value for value in (_meminfo_available(), _cgroup_headroom()) if value is not None]
    return min(known) if known else None
