"""python -m michi.services.listen --port 50061"""
import asyncio

from michi.proto.listen.v1 import listen_pb2_grpc
from michi.serving.server import Stage, configure_logging, model_executor, start_metrics
from michi.serving.stage_cli import load_model, stage_parser

from .server import ListenServicer


async def main() -> None:
    args = stage_parser("listen", 50061).parse_args()
    configure_logging("listen")
    servicer = ListenServicer(load_model(args), model_executor())
    start_metrics(args.metrics_port)
    stage = Stage("listen", ["michi.listen.v1.Listen"],
                  lambda server: listen_pb2_grpc.add_ListenServicer_to_server(servicer, server),
                  args.port, args.host, drain_s=args.drain_s)
    await stage.serve_forever()


asyncio.run(main())
