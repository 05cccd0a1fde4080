"""A backbone replica wedged on purpose (its engine's tick blocks: the stage's fault-injection
hook) beside a healthy one: its watchdog turns its health NOT_SERVING, the live call on it moves
to the healthy replica and goes on, and a new call goes to the healthy replica at once."""
import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from michi.proto.gateway.v1 import gateway_pb2 as pb
from michi.serving import client
from michi.serving.launcher import free_port, wait_healthy
from services.gateway.stages import rendezvous_order

pytestmark = pytest.mark.slow
WEDGE_AFTER_TICKS = 12
WEDGE_S = 8


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status


def test_a_wedged_backbone_goes_not_serving_and_its_calls_move(mesh):
    port = free_port()
    saved = dict(mesh.env)  # only this replica gets the hook
    mesh.env.update(MICHI_TEST_WEDGE_AFTER_TICKS=str(WEDGE_AFTER_TICKS), MICHI_TEST_WEDGE_S=str(WEDGE_S))
    try:
        wedgeable = mesh._spawn("backbone-wedge", "backbone", port, ["--stall-s", "1"])
    finally:
        mesh.env = saved
    wedged, healthy = f"127.0.0.1:{port}", mesh.addresses["backbone"][0]
    wait_healthy(wedged, 120, wedgeable)
    gw_port = free_port()
    gateway = mesh._spawn("gateway-wedge", "gateway", gw_port, [
        "--listen", mesh.addresses["listen"][0], "--backbone", f"{wedged},{healthy}",
        "--vocoder", mesh.addresses["vocoder"][0], "--stage-timeout-s", "1.5"])
    address = f"127.0.0.1:{gw_port}"
    wait_healthy(address, 120, gateway)
    replicas = [wedged, healthy]
    session = next(f"wedge-{i}" for i in range(1000) if rendezvous_order(f"wedge-{i}", replicas)[0] == wedged)
    try:
        t0 = time.monotonic()
        result = asyncio.run(client.converse(address, client.config(session_id=session, max_ticks=40),
                                             timeout_s=60))
        wall_s = time.monotonic() - t0
        # every tick came, the ones after the wedge from the healthy replica
        assert result.ended.reason == pb.MAX_TICKS and len(result.audio_chunks) == 40
        assert [c.tick for c in result.audio_chunks] == list(range(40))
        assert wall_s < 40 * 0.08 + 1.5 + 3, wall_s  # one stage timeout, then real time again
        assert _health(wedged) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(healthy) == health_pb2.HealthCheckResponse.SERVING
        # a new call that ranks the wedged replica first goes to the healthy one without waiting
        other = next(f"wedge-new-{i}" for i in range(1000)
                     if rendezvous_order(f"wedge-new-{i}", replicas)[0] == wedged)
        fresh = asyncio.run(client.converse(address, client.config(session_id=other, max_ticks=5), timeout_s=30))
        assert fresh.ended.reason == pb.MAX_TICKS and fresh.first_audio_ms < 1000, fresh.first_audio_ms
        deadline = time.monotonic() + WEDGE_S + 10  # the hook lets go: the watchdog says SERVING again
        while _health(wedged) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "the wedged stage never recovered"
            time.sleep(0.25)
    finally:
        mesh.kill("gateway-wedge")
        mesh.kill("backbone-wedge")
