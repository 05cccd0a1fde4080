"""python -m services.backbone --port 50062"""
import os
import threading

from michi.proto.backbone.v1 import backbone_pb2_grpc
from michi.serving.stage_cli import serve_model_stage

from .server import BackboneServicer

# Fault injection, for tests only: MICHI_TEST_WEDGE_AFTER_TICKS=N makes the engine's tick block
# after N ticks (every later tick blocks too), for MICHI_TEST_WEDGE_S seconds (default: for good),
# as a stuck model call would: the stage's watchdog must then report NOT_SERVING.
WEDGE_AFTER_TICKS = "MICHI_TEST_WEDGE_AFTER_TICKS"
WEDGE_S = "MICHI_TEST_WEDGE_S"


def flags(parser) -> None:
    parser.add_argument("--batch-window-ms", type=float, default=4.0,
                        help="how long a round waits for the other calls' ticks")


def wedge(engine, after_ticks: int, seconds: float | None) -> None:
    tick, done, never = engine.tick, [0], threading.Event()

    def wedged_tick(inputs, **kw):
        done[0] += 1
        if done[0] > after_ticks:
            never.wait(seconds)
        return tick(inputs, **kw)

    engine.tick = wedged_tick


def make_servicer(michi, executor, args) -> BackboneServicer:
    servicer = BackboneServicer(michi, executor, window_s=args.batch_window_ms / 1e3)
    if os.environ.get(WEDGE_AFTER_TICKS):
        seconds = os.environ.get(WEDGE_S)
        wedge(servicer.engine, int(os.environ[WEDGE_AFTER_TICKS]), float(seconds) if seconds else None)
    return servicer


serve_model_stage("backbone", 50062, "michi.backbone.v1.Backbone", backbone_pb2_grpc.add_BackboneServicer_to_server,
                  make_servicer, flags)
