"""Allocator tuning: freed tensor memory is reused instead of being faulted in again (glibc only)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from camserve.allocator import user_chose_allocator

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-specific"
)

# allocate, touch and free a 48 MB tensor (a batch-8 activation) 16 times; report the page faults of
# the last 4 rounds (glibc needs a few rounds to coalesce the aligned blocks it can reuse)
PROBE = """
import resource, sys, torch
from camserve.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    torch.empty(12_000_000).fill_(1.0)
start = faults()
for _ in range(4):
    torch.empty(12_000_000).fill_(1.0)
print(applied, (faults() - start) // 4)
"""


def run_probe(mode: str, **env: str) -> tuple[bool, int]:
    chosen = ("LD_PRELOAD", "GLIBC_TUNABLES")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in chosen}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_tuned_process_reuses_freed_memory_without_page_faults():
    applied, tuned_faults = run_probe("tuned")
    untouched, default_faults = run_probe("default")
    assert applied and not untouched
    assert default_faults > 10_000  # 48 MB = ~11,700 pages mapped afresh every round by default
    assert tuned_faults < 100


@glibc_only
def test_operator_choice_is_left_alone():
    applied, faults = run_probe("tuned", MALLOC_ARENA_MAX="4")
    assert not applied and faults > 10_000


def test_user_chose_allocator_reads_the_environment(monkeypatch):
    for name in [k for k in os.environ if k.startswith("MALLOC_")] + ["LD_PRELOAD", "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name, raising=False)
    assert not user_chose_allocator()
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert user_chose_allocator()
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert user_chose_allocator()
