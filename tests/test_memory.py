"""Free memory as `--recompute auto` sees it: the system's, capped by the memory cgroups above the process."""

import os

import torch

from minilora.training.memory import available_memory, cgroup_headroom, system_available


def _write(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)


def test_cgroup_v1_limit_minus_usage_without_dropable_page_cache(tmp_path):
    group = tmp_path / "memory" / "job" / "42"
    _write(group, memory__limit_in_bytes=str(8 << 30), memory__usage_in_bytes=str(5 << 30),
           memory__stat=f"cache 1\ntotal_inactive_file {1 << 30}\n")
    _write(tmp_path / "memory", memory__limit_in_bytes="9223372036854771712", memory__usage_in_bytes="1")
    text = "4:memory:/job/42\n3:cpu:/\n"
    assert cgroup_headroom(text, tmp_path) == (8 << 30) - (4 << 30)


def test_cgroup_v2_takes_the_tightest_ancestor_and_reads_max_as_no_limit(tmp_path):
    _write(tmp_path, cgroup__controllers="memory", memory__max="max", memory__current="0")
    _write(tmp_path / "slice", memory__max=str(4 << 30), memory__current=str(3 << 30))
    _write(tmp_path / "slice" / "job", memory__max=str(16 << 30), memory__current=str(1 << 30),
           memory__stat=f"anon 5\ninactive_file {1 << 29}\n")
    assert cgroup_headroom("0::/slice/job\n", tmp_path) == 1 << 30  # the slice leaves 1 GiB
    _write(tmp_path / "slice", memory__max="max", memory__current="0")
    assert cgroup_headroom("0::/slice/job\n", tmp_path) == (16 << 30) - (1 << 30) + (1 << 29)


def test_no_cgroup_limit_is_none(tmp_path):
    assert cgroup_headroom("0::/\n", tmp_path) is None
    assert cgroup_headroom("", tmp_path) is None


def test_this_machine():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < available_memory(torch.device("cpu")) <= total
    assert 0 < system_available() <= total
