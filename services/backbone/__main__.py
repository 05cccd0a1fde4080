"""python -m michi.services.backbone --port 50062"""
import asyncio

from michi.proto.backbone.v1 import backbone_pb2_grpc
from michi.serving.server import Stage, configure_logging, model_executor, start_metrics
from michi.serving.stage_cli import load_model, stage_parser

from .server import BackboneServicer


async def main() -> None:
    parser = stage_parser("backbone", 50062)
    parser.add_argument("--batch-window-ms", type=float, default=4.0,
                        help="how long a round waits for the other calls' ticks")
    args = parser.parse_args()
    configure_logging("backbone")
    servicer = BackboneServicer(load_model(args), model_executor(), window_s=args.batch_window_ms / 1e3)
    start_metrics(args.metrics_port)
    stage = Stage("backbone", ["michi.backbone.v1.Backbone"],
                  lambda server: backbone_pb2_grpc.add_BackboneServicer_to_server(servicer, server),
                  args.port, args.host, drain_s=args.drain_s)
    await stage.serve_forever()


asyncio.run(main())
