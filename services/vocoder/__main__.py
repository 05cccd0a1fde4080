"""python -m services.vocoder --port 50063 [--execution onnxruntime | --execution triton --triton-url host:8001]"""
from michi.proto.vocoder.v1 import vocoder_pb2_grpc
from michi.serving.execution import add_execution_args, vocoder_streams
from michi.serving.stage_cli import serve_model_stage

from .server import VocoderServicer

serve_model_stage("vocoder", 50063, "michi.vocoder.v1.Vocoder", vocoder_pb2_grpc.add_VocoderServicer_to_server,
                  lambda michi, executor, args: VocoderServicer(
                      michi, executor, vocoder_streams(michi, args.execution, args.triton_url, args.onnx_dir, args.threads)),
                  extra_args=add_execution_args)
