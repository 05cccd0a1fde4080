"""Docker HEALTHCHECK / manual probe: gRPC health checking (grpc.health.v1) of the stage in this
container. Exit 0 when SERVING, 1 otherwise (NOT_SERVING while draining, unreachable, timeout).

    python /opt/michi/healthcheck.py [STAGE|HOST:PORT]

With no argument it checks the address entrypoint.py recorded at start (the stage's --port,
MICHI_<STAGE>_PORT or default), else the stage named by MICHI_STAGE. It imports grpc only, not
michi (no torch import), so a probe costs a fraction of a second. Kubernetes uses its built-in
`grpc:` probes against the same health service instead."""
from __future__ import annotations

import os
import sys

DEFAULT_PORTS = {"gateway": 50060, "listen": 50061, "backbone": 50062, "vocoder": 50063}  # = michi.serving.launcher
HEALTH_TARGET = os.environ.get("MICHI_HEALTH_TARGET", "/tmp/michi-health-target")  # written by entrypoint.py


def target(argv: list[str], environ=os.environ, recorded: str = HEALTH_TARGET) -> str:
    if not argv and os.path.exists(recorded):
        with open(recorded) as f:
            return f.read().strip()
    arg = argv[0] if argv else environ.get("MICHI_STAGE", "")
    if ":" in arg:
        return arg
    if arg not in DEFAULT_PORTS:
        raise SystemExit(f"healthcheck: unknown stage {arg!r}")
    port = environ.get(f"MICHI_{arg.upper()}_PORT", DEFAULT_PORTS[arg])
    return f"127.0.0.1:{port}"


def check(address: str, timeout_s: float = 3.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            print(f"{address}: {e.code().name}", file=sys.stderr)
            return False
    ok = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not ok:
        print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
    return ok


if __name__ == "__main__":
    sys.exit(0 if check(target(sys.argv[1:])) else 1)
