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


def channel(address: str, root_certs: bytes | None = None, server_name: str | None = None,
            options: list | None = None) -> grpc.Channel:
    """A blocking channel: insecure, or TLS trusting `root_certs` (PEM; a self-signed server
    certificate is its own root). `server_name`: the name to check the certificate against when it
    is not the address's host (a certificate for a public name, checked over 127.0.0.1)."""
    if root_certs is None:
        return grpc.insecure_channel(address, options=options)
    options = list(options or []) + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root_certs), options=options)


def wait_healthy(address: str, timeout_s: float, process: subprocess.Popen | None = None,
                 root_certs: bytes | None = None, server_name: str | None = None) -> None:
    """Until the stage at `address` says SERVING (gRPC health checking). A TLS stage (the gateway
    with a certificate) is checked over TLS: pass its certificate, or the CA's, as `root_certs`."""
    deadline = time.monotonic() + timeout_s
    last_error = ""
    with channel(address, root_certs, server_name) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"stage at {address} exited with code {process.returncode} while starting")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as e:
                last_error = f"{e.code().name}: {e.details()}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"stage at {address} not healthy after {timeout_s:.0f} s"
                                   + (f" (last health check: {last_error})" if last_error else ""))
            time.sleep(0.1)


@dataclass
class Mesh:
    """A running mesh of stage processes. Extra replicas: `replicas={"backbone": 2}`. Extra flags
    per stage (every replica of it): `stage_args={"backbone": ["--metrics-port", "9102"]}`.
    `gateway_env`: environment of the gateway process only (its secrets: MICHI_AUTH_TOKEN).
    `gateway_host`: where the gateway listens (the other stages stay on 127.0.0.1).
    `gateway_root_certs`: the gateway serves TLS (its --tls-cert/--tls-key in `gateway_args`): the
    certificate (or its CA) the start-up health check trusts; `gateway_server_name` the name it
    checks the certificate against when not the address (see `channel`)."""

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
    gateway_env: dict[str, str] = field(default_factory=dict)
    gateway_host: str = "127.0.0.1"
    gateway_root_certs: bytes | None = None
    gateway_server_name: str | None = None

    @property
    def gateway(self) -> str:
        """The gateway's address as a client on this machine reaches it."""
        host = self.gateway_host.strip("[]")
        if host in ("", "0.0.0.0", "::"):  # every interface: loopback is one of them
            host = "127.0.0.1"
        return f"[{host}]:{self.ports['gateway']}" if ":" in host else f"{host}:{self.ports['gateway']}"

    def _spawn(self, name: str, stage: str, port: int, extra: list[str],
               env: dict[str, str] | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", f"services.{stage}", "--port", str(port), "--model", self.model,
               "--threads", str(self.threads), *extra]
        out = open(os.path.join(self.log_dir, f"{name}.log"), "w") if self.log_dir else None
        env = {**os.environ, **self.env, **(env or {})}
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
                "--vocoder", ",".join(self.addresses["vocoder"]),
                *(["--host", self.gateway_host] if self.gateway_host != "127.0.0.1" else []),
                *self.gateway_args, *self.stage_args.get("gateway", [])], env=self.gateway_env)
            wait_healthy(self.gateway, timeout_s, gateway, self.gateway_root_certs, self.gateway_server_name)
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
