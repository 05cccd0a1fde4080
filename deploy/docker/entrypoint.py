"""Container entrypoint: `python /opt/michi/entrypoint.py STAGE [flags...]` runs
`python -m services.STAGE [flags...]` (STAGE: listen, backbone, vocoder, gateway; or the
MICHI_STAGE environment variable when no argument is given).
The Prometheus endpoint binds MICHI_METRICS_HOST (0.0.0.0 in the image, so the cluster can scrape it)."""
from __future__ import annotations

import os
import runpy
import sys

STAGES = ("listen", "backbone", "vocoder", "gateway")
DEFAULT_PORTS = {"gateway": 50060, "listen": 50061, "backbone": 50062, "vocoder": 50063}  # = michi.serving.launcher
HEALTH_TARGET = os.environ.get("MICHI_HEALTH_TARGET", "/tmp/michi-health-target")  # read by healthcheck.py


def stage_from(argv: list[str], environ=os.environ) -> tuple[str, list[str]]:
    if argv and argv[0] in STAGES:
        return argv[0], argv[1:]
    stage = environ.get("MICHI_STAGE", "")
    if stage not in STAGES:
        raise SystemExit(f"entrypoint: name a stage ({', '.join(STAGES)}) as the first argument or in MICHI_STAGE; "
                         f"got {argv[:1] or stage!r}")
    return stage, argv


def port_of(stage: str, args: list[str], environ=os.environ) -> int:
    """The port the stage will listen on: --port, else MICHI_<STAGE>_PORT, else its default."""
    for i, arg in enumerate(args):
        if arg == "--port" and i + 1 < len(args):
            return int(args[i + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    return int(environ.get(f"MICHI_{stage.upper()}_PORT", DEFAULT_PORTS[stage]))


def main() -> None:
    stage, rest = stage_from(sys.argv[1:])
    try:
        with open(HEALTH_TARGET, "w") as f:
            f.write(f"127.0.0.1:{port_of(stage, rest)}\n")
    except OSError:
        pass  # a read-only /tmp: healthcheck.py falls back on MICHI_STAGE
    os.environ.setdefault("MICHI_METRICS_HOST", "0.0.0.0")
    sys.argv = [f"michi-{stage}", *rest]
    runpy.run_module(f"services.{stage}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
