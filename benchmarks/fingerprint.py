"""A fingerprint of every run under a results folder: its losses, mean metrics and a hash of its tensors, to show
that a change left results bit for bit as they were.

    python -m dia.grid sweeps/fingerprint.yaml --run-all --results-root before   # on the old commit
    python benchmarks/fingerprint.py before before.json
    ... the same on the new commit into `after` ...
    python benchmarks/fingerprint.py after after.json --compare before.json     # exit 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from dia.run import record


def fingerprint(root: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(Path(root).rglob(record.METRICS)):
        m = record.read_metrics(path)
        tensors = record.read_tensors(path.parent)
        h = hashlib.sha256()
        for k in sorted(tensors):
            h.update(k.encode())
            h.update(tensors[k].numpy().tobytes())
        out[str(path.parent.relative_to(root))] = {
            "losses": [v["loss"] for v in m["victims"]],
            "mean": m.get("mean", {}),
            "tensors": h.hexdigest(),
        }
    return out


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("results")
    a.add_argument("out")
    a.add_argument("--compare", default=None, help="an earlier fingerprint: exit 1 unless every run is identical")
    args = a.parse_args()
    now = fingerprint(Path(args.results))
    Path(args.out).write_text(json.dumps(now, indent=1, sort_keys=True))
    print(f"{len(now)} runs -> {args.out}")
    if args.compare:
        then = json.loads(Path(args.compare).read_text())
        differ = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
        print(
            f"identical: {len(now) - len(differ)} of {len(set(then) | set(now))}"
            + (f"; differ: {differ}" if differ else "")
        )
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
