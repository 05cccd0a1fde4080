"""Michi: a full-duplex speech language model. `import michi; model = michi.load()`."""
from .api import DEFAULT_MODEL, Michi, Session, Tick, load
from .config import MichiConfig, preset

__all__ = ["DEFAULT_MODEL", "Michi", "MichiConfig", "Session", "Tick", "load", "preset"]
