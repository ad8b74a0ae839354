"""The run contract's signals: `dia.signals` (stdlib only, so commands install the handlers before
anything slow), re-exported here where the rest of dia.run looks for it."""

from dia.signals import STOP, Interrupted, Preempted, Stopped, StopRequest, install, stop_point  # noqa: F401

__all__ = ["STOP", "Interrupted", "Preempted", "Stopped", "StopRequest", "install", "stop_point"]
