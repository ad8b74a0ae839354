"""dia.memory: glibc keeps freed memory for the attack's per-iteration allocations (docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import resource, torch
from dia.memory import keep_freed_memory
print(keep_freed_memory())
x = torch.randn(256, 256)
for i in range(30):  # the attack's pattern: the same large temporaries, allocated and freed every iteration
    if i == 10:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ys = [x.repeat(4 + j, 4) for j in range(6)]  # 4-9 MiB each
    del ys
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(keep: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        env={"DIA_KEEP_MEMORY": keep, "PATH": "/usr/bin:/bin"},
    ).stdout.split()
    return out[0], int(out[1])


def test_kept_memory_stops_the_page_faults_of_repeated_large_temporaries():
    (on, kept), (off, default) = _probe("1"), _probe("0")
    assert (on, off) == ("True", "False")
    assert 20 * kept < default, (kept, default)  # measured: about 1,000 against 120,000
