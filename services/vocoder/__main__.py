"""python -m michi.services.vocoder --port 50063"""
from michi.proto.vocoder.v1 import vocoder_pb2_grpc
from michi.serving.stage_cli import serve_model_stage

from .server import VocoderServicer

serve_model_stage("vocoder", 50063, "michi.vocoder.v1.Vocoder", vocoder_pb2_grpc.add_VocoderServicer_to_server,
                  lambda michi, executor, args: VocoderServicer(michi, executor))
