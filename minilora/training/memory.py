"""How much memory this process may still take: what `--recompute auto` weighs activations against.

On a GPU, the device's free memory. On a CPU, the smaller of the system's available memory
(/proc/meminfo's MemAvailable) and what the memory cgroups above this process leave: a container, a
Slurm job or a systemd slice caps a process far below the machine's free memory, and going over that
cap gets the process killed without a word. Both cgroup versions are read, along the process's own
cgroup path and its ancestors (the tightest limit wins). A cgroup's usage counts page cache the kernel
can drop (the model file, the mapped token store), so its inactive file pages are not counted as used.
"""

import os
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_LIMIT = 2**62  # cgroup v1 writes "no limit" as a huge number (9223372036854771712 = 2^63 - 4096)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" or not text.lstrip("-").isdigit() else int(text)


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _ancestors(relative: str) -> list[str]:
    """'/a/b' -> ['a/b', 'a', '']: the cgroup and every group above it, as paths under a hierarchy."""
    parts = [p for p in relative.split("/") if p]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_headroom(proc_cgroup: str, root: Path = CGROUP_ROOT) -> int | None:
    """Bytes the memory cgroups holding this process still allow (None: no limit found).

    `proc_cgroup` is /proc/self/cgroup's text. Inside a container the process's cgroup path may not
    exist under `root` (its namespace shows its own group as the root), so the root itself is read too."""
    room = []
    for line in proc_cgroup.splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            # Mounted at the root, or at unified/ beside the v1 hierarchies (the "hybrid" layout).
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            limit_name, usage_name, stat_key = "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            base, limit_name, usage_name, stat_key = (root / "memory", "memory.limit_in_bytes",
                                                      "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        for group in _ancestors(path):
            folder = base / group
            limit = _read_int(folder / limit_name)
            if limit is None or limit >= NO_LIMIT:
                continue
            used = (_read_int(folder / usage_name) or 0) - _stat_value(folder / "memory.stat", stat_key)
            room.append(limit - max(used, 0))
    return min(room) if room else None


def system_available() -> int | None:
    """MemAvailable from /proc/meminfo, else free pages times the page size (None if neither is known)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name (macOS)
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes this process may still allocate on `device` (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        proc_cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        proc_cgroup = ""
    known = [m for m in (system_available(), cgroup_headroom(proc_cgroup)) if m is not None]
    return min(known) if known else None
