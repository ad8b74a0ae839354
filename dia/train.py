"""`python -m dia.train [group=choice ...] [key=value ...]`: one attack configuration, end to end.

Bad input ends with one line on stderr naming the problem and the valid choices, and exit code 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dia.errors import ExitCode, UserError
from dia.memory import keep_freed_memory
from dia.run import signals

USAGE_HINT = "see `python -m dia.train --help`"


def _table(rows: list[dict]) -> str:
    """The per-victim rows as a console table (about 120 columns): the run's bookkeeping, then the metrics
    table's console columns (metrics.json has every metric, the baselines of the mask measures too)."""
    from dia.metrics import METRICS

    cols = [
        ("victim", "index", "{}"),
        ("label", "label", "{}"),
        ("status", "status", "{}"),
        ("iters", "iterations", "{}"),
        ("loss", "loss", "{:.2e}"),
    ]
    cols += [
        (m.label, m.key, m.fmt)
        for m in METRICS
        if m.column and m.console and any(r.get(m.key) is not None for r in rows)
    ]
    cells = [[h for h, _, _ in cols]] + [
        ["-" if r.get(k) is None else f.format(r[k]) for _, k, f in cols] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    signals.install()  # first, before anything slow: a signal during start-up is a clean stop (dia.run.signals)
    keep_freed_memory()  # before torch allocates: no page faults per attack iteration on a CPU (dia.memory)
    try:
        from dia.config import compose, help_text
        from dia.run.folder import AlreadyDone, check_done  # no torch: a finished run is found in a blink

        if "-h" in args or "--help" in args:
            return _emit(lambda: print(help_text([a for a in args if a not in ("-h", "--help")])))
        base = None
        if "--config" in args:
            i = args.index("--config")
            if i + 1 >= len(args):
                raise UserError("--config needs a file")
            base = Path(args[i + 1])
            del args[i : i + 2]
        describe = "--describe-model" in args
        args = [a for a in args if a != "--describe-model"]
        unknown = [a for a in args if a.startswith("-")]
        if unknown:
            raise UserError(f"unknown option '{unknown[0]}'; {USAGE_HINT}")
        cfg = compose(args, base=base)
        if not describe:
            try:
                check_done(cfg)  # the same run, finished: say where its results are, before anything slow
            except AlreadyDone as done:
                return _report(done.metrics, done.folder, done=True)
        from dia.console import quiet_libraries

        quiet_libraries()
        if describe:
            return _emit(lambda: _describe(cfg))
        from dia.run import execute

        try:
            signals.stop_point("the run")
            outcome = execute([cfg], progress=cfg.run.progress)[0]
        except signals.Stopped as exc:
            print(
                f"{'interrupted' if exc.exit_code == ExitCode.INTERRUPTED else 'preempted'}: {exc}; "
                "rerun the same command to resume",
                file=sys.stderr,
            )
            return exc.exit_code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except (KeyboardInterrupt, SystemExit) as exc:  # a second Ctrl-C (Lightning turns it into exit 1)
        if isinstance(exc, SystemExit) and not signals.STOP.aborted:
            raise
        print("interrupted: the last saved checkpoint is kept; rerun the same command to resume", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # a fault (full disk, out of memory) or a bug: the run's folder stays as it was
        if os.environ.get("DIA_DEBUG"):
            raise
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(
            f"error: {type(exc).__name__}: {first}; the run's folder and checkpoint are kept: fix the cause and rerun "
            "the same command to resume (DIA_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return ExitCode.FAILED
    out = outcome.output
    return _report(out.metrics, out.folder, logged=out.logged, done=outcome.message is not None)


def _emit(write: Callable[[], Any]) -> int:
    """Run `write` (printing to stdout) and flush; a reader that closed the pipe (`--help | head -3`) ends it
    quietly: exit 0, no error (as `dia.grid --list | head` does)."""
    try:
        write()
        sys.stdout.flush()
    except BrokenPipeError:
        # what is still buffered would fail again at exit: point stdout at /dev/null
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return ExitCode.OK


def _report(m: dict, folder: Path, *, logged: dict[str, str] | None = None, done: bool = False) -> int:
    """Print the run's summary (a reader that went away, `| head`, changes nothing: the run is complete) and return
    its exit code (0, or 3: diverged). `done`: a finished run of this config, found (nothing was run)."""
    _emit(lambda: _summary(m, folder, logged=logged or {}, done=done))
    return ExitCode.OK if m.get("status") == "completed" else ExitCode.DIVERGED


def _summary(m: dict, folder: Path, *, logged: dict[str, str], done: bool) -> None:
    """The per-victim table, the means and where the run's files are."""
    print()
    print(_table(m["victims"]))
    from dia.metrics import METRICS

    means = m.get("mean") if isinstance(m.get("mean"), dict) else {}
    mean = {k.key: means[k.key] for k in METRICS if k.brief and isinstance(means.get(k.key), (int, float))}
    steps = (m.get("client") or {}).get("local_steps", 1)
    parts = [
        f"status {m.get('status')}",
        *(f"mean {k} {v:.4g}" for k, v in mean.items()),
        *([f"{m['wall_time_s']:.1f} s on {m.get('device')}"] if isinstance(m.get("wall_time_s"), (int, float)) else []),
    ]
    print(
        f"\n{m['attack'].upper()} on {m['model']}/{m['data']} p={m['dropout']:g}{f' T={steps}' if steps > 1 else ''}: "
        + ", ".join(parts)
    )
    from dia.run import record

    names = (record.CONFIG, record.METRICS, record.CURVES, record.PICTURE, record.TENSORS)
    files = " ".join(f for f in names if (folder / f).exists())
    if done:
        print(
            f"already done: {folder}{os.sep} holds this config's finished run ({files}); nothing was run. To run it "
            "again, choose another run.output_dir or run.name"
        )
    else:
        print(f"wrote {folder}{os.sep}: {files}")
    for name, where in logged.items():
        if name == "wandb" and "offline" in where:
            print(
                f"W&B offline run: {where} (upload with `wandb sync {Path(where).parent}`, which holds every "
                "process's part of it)"
            )
        else:
            print(f"{name}: {where}")


def _describe(cfg) -> int:
    import torch

    from dia.models import build_for, describe_sites

    model = build_for(cfg)
    example = torch.zeros(cfg.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    sites = describe_sites(model, example)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model={cfg.model.name} on {cfg.data.channels}x{cfg.data.image_size}x{cfg.data.image_size}: "
        f"{n_params:,} parameters, {len(sites)} dropout sites"
    )
    for s in sites:
        print(f"  {s['site']:<28} p={s['p']:<5g} mask {s['mask_shape']}  ({s['captured_by']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
