"""Start the Triton Inference Server that the `nvidia-pytriton` wheel bundles, on a model repository.

That server (CPU or GPU, Python backend only) needs numpy < 2, which this project does not pin, so
it lives in an environment of its own, as it would in its own container:

    python3 -m venv .venv-triton && .venv-triton/bin/pip install nvidia-pytriton==0.7.0 onnxruntime

In production, run NVIDIA's Triton image on the `michi triton export` repository instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_ENV = Path(os.environ.get("MICHI_TRITON_ENV", ".venv-triton"))
SETUP_HINT = ("python3 -m venv .venv-triton && .venv-triton/bin/pip install nvidia-pytriton==0.7.0 onnxruntime")


def _site_packages(env: Path) -> Path:
    found = sorted(env.glob("lib/python3.*/site-packages/pytriton/tritonserver"))
    if not found:
        raise FileNotFoundError(f"no Triton server in {env} (the nvidia-pytriton wheel); make one with: {SETUP_HINT}")
    return found[-1].parent.parent


class TritonServer:
    """A tritonserver process on `repository`, gRPC on `port`; a context manager."""

    def __init__(self, repository: str | Path, port: int, env: str | Path = DEFAULT_ENV, log_path: str | Path | None = None):
        self.repository, self.port, self.env = Path(repository).resolve(), port, Path(env).resolve()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> "TritonServer":
        site = _site_packages(self.env)
        python = site.parent.name[len("python"):]  # lib/python3.11/site-packages -> 3.11
        self._workdir = tempfile.TemporaryDirectory(prefix="michi-triton-")
        dist = Path(self._workdir.name) / "tritonserver"
        # The Python backend runs the stub built for this environment's Python, as pytriton does.
        shutil.copytree(site / "pytriton/tritonserver", dist, ignore=shutil.ignore_patterns("python_backend_stubs"))
        shutil.copy(site / f"pytriton/tritonserver/python_backend_stubs/{python}/triton_python_backend_stub",
                    dist / "backends/python/")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(site / "nvidia_pytriton.libs"),
                                                          env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = f"{self.env / 'bin'}:{env['PATH']}"  # the stub's Python is the environment's
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [str(dist / "bin/tritonserver"), f"--model-repository={self.repository}",
             f"--backend-directory={dist / 'backends'}", f"--grpc-port={self.port}",
             "--allow-http=false", "--allow-metrics=false", "--log-verbose=0"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(self.url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with status {self.process.returncode}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                if client.is_server_ready():
                    return
            except Exception:  # noqa: BLE001  not listening yet (tritonclient's own errors, or the socket's)
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._workdir:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(repository: str, port: int, env: str) -> int:
    """Run the server in the foreground until interrupted."""
    with TritonServer(repository, port, env) as server:
        print(f"Triton serving {repository} on {server.url} (gRPC); Ctrl-C stops it", file=sys.stderr)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
    return 0
