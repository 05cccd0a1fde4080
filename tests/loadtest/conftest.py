"""The load test lives in the repository's `loadtest/` package (not installed): importable from here."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
