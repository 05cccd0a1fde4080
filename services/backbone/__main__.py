"""python -m michi.services.backbone --port 50062"""
from michi.proto.backbone.v1 import backbone_pb2_grpc
from michi.serving.stage_cli import serve_model_stage

from .server import BackboneServicer


def flags(parser) -> None:
    parser.add_argument("--batch-window-ms", type=float, default=4.0,
                        help="how long a round waits for the other calls' ticks")


serve_model_stage("backbone", 50062, "michi.backbone.v1.Backbone", backbone_pb2_grpc.add_BackboneServicer_to_server,
                  lambda michi, executor, args: BackboneServicer(michi, executor, window_s=args.batch_window_ms / 1e3),
                  flags)
