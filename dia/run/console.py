"""The console of every dia command: dia's own notices, without library banners and known-harmless warnings."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    """Keep Lightning's banner lines and known-harmless warnings out of the researcher's console."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*number of training batches.*",
                    ".*`isinstance.*treespec.*", ".*Checkpoint directory.*", ".*returned `None`.*no optimizer.*",
                    ".*module\\(s\\) in eval mode.*", ".*anonymous setting.*", ".*`srun` command is available.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    notices = logging.getLogger("dia")
    if not notices.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        notices.addHandler(handler)
        notices.setLevel(logging.INFO)
