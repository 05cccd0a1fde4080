"""python -m michi.services.vocoder --port 50063"""
import asyncio

from michi.proto.vocoder.v1 import vocoder_pb2_grpc
from michi.serving.server import Stage, configure_logging, model_executor, start_metrics
from michi.serving.stage_cli import load_model, stage_parser

from .server import VocoderServicer


async def main() -> None:
    args = stage_parser("vocoder", 50063).parse_args()
    configure_logging("vocoder")
    servicer = VocoderServicer(load_model(args), model_executor())
    start_metrics(args.metrics_port)
    stage = Stage("vocoder", ["michi.vocoder.v1.Vocoder"],
                  lambda server: vocoder_pb2_grpc.add_VocoderServicer_to_server(servicer, server),
                  args.port, args.host, drain_s=args.drain_s)
    await stage.serve_forever()


asyncio.run(main())
