"""Run the `saewb` program with glibc's huge-page malloc.

A training step's large temporaries (the [batch, n_latents] pre-activations: 268 MB at 4096 ×
16384) are each a fresh `mmap` every step, and glibc will not keep them (its mmap threshold caps at
32 MB). Touching a fresh 4 kB-paged mapping costs one page fault per page: measured on the 2-core
CI machine, a TopK step (d 384, n 16384, k 32, batch 4096) took 641 ms with 4 kB pages and 508 ms
with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which has malloc ask for transparent huge pages
(2 MB). The tunable is read when the process starts, so the program re-executes itself once with it.
Set `SAEWB_NO_HUGEPAGES=1` to opt out; elsewhere than Linux with glibc it does nothing.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"


def tunables_with_huge_pages(current: str) -> str | None:
    """GLIBC_TUNABLES with the huge-page setting added, or None if it already names one."""
    if "glibc.malloc.hugetlb" in current:
        return None
    return f"{current}:{TUNABLE}" if current else TUNABLE


def reexec_with_huge_pages() -> None:
    """Replace this process with the same command under the tunable (once; a no-op when set)."""
    if os.environ.get("SAEWB_NO_HUGEPAGES") or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    tunables = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES", ""))
    if tunables is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(
        sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables}
    )
