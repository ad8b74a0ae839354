"""The console of every dia command: dia's own notices, without library banners and known-harmless warnings."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

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
    ".*`Trainer.fit` stopped.*",
)


@contextmanager
def quiet() -> Iterator[None]:
    """Inside: Lightning's banners and known-harmless warnings are not shown (library use: restored after)."""
    levels = {name: logging.getLogger(name).level for name in LIGHTNING}
    for name in LIGHTNING:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for pattern in HARMLESS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def quiet_libraries() -> None:
    """Keep Lightning's banner lines and known-harmless warnings out of the researcher's console (commands)."""
    for name in LIGHTNING:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    notices = logging.getLogger("dia")
    if not notices.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        notices.addHandler(handler)
        notices.setLevel(logging.INFO)


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a notice comes (not the stream it was made with, which
    a caller, such as a test capturing output, may have closed since)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler sets it once; sys.stderr is read at each notice
        pass
