"""python -m services.listen --port 50061 [--execution onnxruntime | --execution triton --triton-url host:8001]"""
from michi.proto.listen.v1 import listen_pb2_grpc
from michi.serving.execution import add_execution_args, encoder_streams
from michi.serving.stage_cli import serve_model_stage

from .server import ListenServicer

serve_model_stage("listen", 50061, "michi.listen.v1.Listen", listen_pb2_grpc.add_ListenServicer_to_server,
                  lambda michi, executor, args: ListenServicer(
                      michi, executor, encoder_streams(michi, args.execution, args.triton_url, args.onnx_dir, args.threads)),
                  extra_args=add_execution_args)
