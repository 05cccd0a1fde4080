"""What the deployment tests share: the deploy/ tools (not a package: put on sys.path here) and
the names of the stages. A module of its own, not conftest.py: `from conftest import` would find
another directory's conftest when the whole suite runs."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(DEPLOY))
sys.path.insert(0, str(DEPLOY / "docker"))

import entrypoint  # noqa: E402
import healthcheck  # noqa: E402
import render  # noqa: E402
import validate  # noqa: E402

__all__ = ["entrypoint", "healthcheck", "render", "validate"]

OVERLAYS = {"base": DEPLOY / "k8s/base", "single-gpu": DEPLOY / "k8s/overlays/single-gpu",
            "scale-out": DEPLOY / "k8s/overlays/scale-out"}
GPU_STAGES = ("listen", "backbone", "vocoder")
STAGES = GPU_STAGES + ("gateway",)
PORTS = {"gateway": 50060, "listen": 50061, "backbone": 50062, "vocoder": 50063}


def objects(docs, kind):
    return {o["metadata"]["name"]: o for o in docs if o["kind"] == kind}
