"""edgeloop's device side.

The artifact contract lives in :mod:`edgeloop_core.contract` because the runtime owns what it accepts; the cloud
components import it. Nothing in this package imports torch, and everything runs on Python 3.10+.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
