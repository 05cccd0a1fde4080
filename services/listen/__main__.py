"""python -m services.listen --port 50061 [--execution onnxruntime | --execution triton --triton-url host:8001]
[--transcript whisper]"""
import argparse

from michi.proto.listen.v1 import listen_pb2_grpc
from michi.serving.execution import add_execution_args, encoder_streams
from michi.serving.stage_cli import env, serve_model_stage
from michi.transcript import SOURCES

from .server import ListenServicer


def add_listen_args(p: argparse.ArgumentParser) -> None:
    add_execution_args(p)
    p.add_argument("--transcript", choices=SOURCES, default=env("TRANSCRIPT", "head"),
                   help="user text source: head (the model's learned listen text head) or whisper "
                        "(faster-whisper tiny.en, streaming with local agreement; needs the `data` extra)")


serve_model_stage("listen", 50061, "michi.listen.v1.Listen", listen_pb2_grpc.add_ListenServicer_to_server,
                  lambda michi, executor, args: ListenServicer(
                      michi, executor, encoder_streams(michi, args.execution, args.triton_url, args.onnx_dir, args.threads),
                      transcript=args.transcript),
                  extra_args=add_listen_args)
