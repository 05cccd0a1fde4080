"""Michi: a full-duplex speech language model. `import michi; model = michi.load("tiny")`."""
from .api import Michi, Session, Tick, load
from .config import MichiConfig, preset

__all__ = ["Michi", "MichiConfig", "Session", "Tick", "load", "preset"]
