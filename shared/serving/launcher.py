"""`michi up`: every stage on this machine, each in its own process, started in order, checked
healthy over gRPC health checking, and stopped cleanly (SIGTERM: each stage drains)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

STAGES = ("listen", "backbone", "vocoder", "gateway")
DEFAULT_PORTS = {"gateway": 50060, "listen": 50061, "backbone": 50062, "vocoder": 50063}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"stage at {address} exited with code {process.returncode} while starting")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"stage at {address} not healthy after {timeout_s:.0f} s")
            time.sleep(0.1)


@dataclass
class Mesh:
    """A running mesh of stage processes. Extra replicas: `replicas={"backbone": 2}`. Extra flags
    per stage (every replica of it): `stage_args={"backbone": ["--metrics-port", "9102"]}`."""

    model: str = "default"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    replicas: dict[str, int] = field(default_factory=dict)
    gateway_args: list[str] = field(default_factory=list)
    stage_args: dict[str, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    threads: int = 0
    log_dir: str | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    addresses: dict[str, list[str]] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.ports['gateway']}"

    def _spawn(self, name: str, stage: str, port: int, extra: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", f"michi.services.{stage}", "--port", str(port), "--model", self.model,
               "--threads", str(self.threads), *extra]
        out = open(os.path.join(self.log_dir, f"{name}.log"), "w") if self.log_dir else None
        env = {**os.environ, **self.env}
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env)
        self.processes[name] = process
        return process

    def start(self, timeout_s: float = 120.0) -> "Mesh":
        try:
            for stage in STAGES[:-1]:
                self.addresses[stage] = []
                for i in range(self.replicas.get(stage, 1)):
                    port = self.ports[stage] if i == 0 else free_port()
                    name = stage if i == 0 else f"{stage}-{i}"
                    self._spawn(name, stage, port, self.stage_args.get(stage, []))
                    self.addresses[stage].append(f"127.0.0.1:{port}")
            for stage in STAGES[:-1]:
                for i, address in enumerate(self.addresses[stage]):
                    wait_healthy(address, timeout_s, self.processes[stage if i == 0 else f"{stage}-{i}"])
            gateway = self._spawn("gateway", "gateway", self.ports["gateway"], [
                "--listen", ",".join(self.addresses["listen"]), "--backbone", ",".join(self.addresses["backbone"]),
                "--vocoder", ",".join(self.addresses["vocoder"]), *self.gateway_args,
                *self.stage_args.get("gateway", [])])
            wait_healthy(self.gateway, timeout_s, gateway)
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, name: str) -> None:
        """Kill one stage process at once (no drain): what a crash looks like."""
        self.processes[name].kill()
        self.processes[name].wait()
        self.killed.add(name)

    def stop(self, timeout_s: float = 15.0) -> dict[str, int]:
        """SIGTERM every stage (gateway first, so calls end before their stages), then wait."""
        codes = {}
        for name in sorted(self.processes, key=lambda n: n != "gateway"):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            codes[name] = process.returncode
        return codes

    def __enter__(self) -> "Mesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
