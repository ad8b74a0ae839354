"""The console of every dia command: dia's own notices, without library banners and known-harmless warnings.

One place for what third-party libraries print that says nothing to a dia user: Lightning's banners and the
warnings its loop gives an attack (no optimizer, modules in eval mode, few batches), torch's "No CUDA runtime is
found" on a CPU-only machine. `quiet()` hides them for the time of a block (a program's fit, library use);
`quiet_libraries()` for the whole process (the commands), and routes notices and warnings around a live progress
bar so that they do not break its line.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

LIGHTNING = ("lightning.pytorch", "lightning.fabric", "lightning")
HARMLESS = (
    ".*does not have many workers.*",
    ".*LeafSpec.*",
    ".*number of training batches.*",
    ".*`isinstance.*treespec.*",
    ".*Checkpoint directory.*",
    ".*returned `None`.*no optimizer.*",
    ".*module\\(s\\) in eval mode.*",
    ".*anonymous setting.*",
    ".*`srun` command is available.*",
    ".*litlogger.*",
    ".*litmodels.*",
    ".*`Trainer.fit` stopped.*",
    ".*`max_epochs` was not set.*",
    ".*`tensorboardX` has been removed as a dependency.*",
)
# torch's loggers: (logger, start of a message that says nothing to a dia user); on a CPU-only machine every
# torch.compile says where CUDA would be, in the middle of the progress bar
TORCH_NOISE = (("torch.utils.cpp_extension", "No CUDA runtime is found"),)


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_TORCH_FILTERS = {name: _DropMessages(tuple(s for n, s in TORCH_NOISE if n == name)) for name, _ in TORCH_NOISE}


def hush() -> Callable[[], None]:
    """Hide Lightning's banners, the known-harmless warnings and torch's noise until the returned function is called.

    Unlike `warnings.catch_warnings` it may be undone out of order (an attack fitted by the user's own Trainer hushes
    in its `setup` hook and undoes it in `teardown`): it removes exactly the filters it added."""
    levels = {name: logging.getLogger(name).level for name in LIGHTNING}
    for name in LIGHTNING:
        logging.getLogger(name).setLevel(logging.ERROR)
    added = [name for name, f in _TORCH_FILTERS.items() if f not in logging.getLogger(name).filters]
    for name in added:
        logging.getLogger(name).addFilter(_TORCH_FILTERS[name])
    before = list(warnings.filters)
    for pattern in HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
    mine = [f for f in warnings.filters if f not in before]

    def undo() -> None:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name in added:
            logging.getLogger(name).removeFilter(_TORCH_FILTERS[name])
        for f in mine:
            if f in warnings.filters:
                warnings.filters.remove(f)
        getattr(warnings, "_filters_mutated", lambda: None)()  # forget what was already decided with them

    return undo


@contextmanager
def quiet() -> Iterator[None]:
    """Inside: Lightning's banners, known-harmless warnings and torch's noise are not shown (library use: restored
    after)."""
    undo = hush()
    try:
        yield
    finally:
        undo()


def write(text: str, stream: TextIO | None = None) -> None:
    """Print a line to `stream` (stderr) without breaking a live tqdm bar: above it, the bar redrawn below."""
    stream = stream or sys.stderr
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
        tqdm.tqdm.write(text, file=stream)
    else:
        print(text, file=stream, flush=True)


class _Notices(logging.Handler):
    """dia's notices (the `dia` logger), one line each, around a live progress bar (`write`)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write(self.format(record))
        except Exception:
            self.handleError(record)


def _recording() -> bool:
    """Whether a `warnings.catch_warnings(record=True)` block (pytest.warns, a caller's own) is collecting warnings:
    a showwarning of ours set inside it would take them from its list."""
    return isinstance(getattr(getattr(warnings, "_showwarnmsg_impl", None), "__self__", None), list)


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    write(f"warning: {message}", file)


def quiet_libraries() -> None:
    """Keep Lightning's banner lines and known-harmless warnings out of the researcher's console (commands); dia's
    notices and the remaining warnings print one line each, above a live progress bar."""
    hush()  # for the whole process: never undone
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    if not _recording():
        warnings.showwarning = _show_warning
    notices = logging.getLogger("dia")
    if not notices.handlers:
        handler = _Notices()
        handler.setFormatter(logging.Formatter("%(message)s"))
        notices.addHandler(handler)
        notices.setLevel(logging.INFO)


def interactive() -> bool:
    """Whether a person watches this process: a Jupyter (IPython kernel) notebook, or a terminal on stderr (where
    progress bars go). `dia.reconstruct(progress=None)` shows its bar then."""
    shell = sys.modules.get("IPython")
    if shell is not None:
        ip = getattr(shell, "get_ipython", lambda: None)()
        if ip is not None and "IPKernelApp" in getattr(ip, "config", {}):
            return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
