"""python -m michi.services.listen --port 50061"""
from michi.proto.listen.v1 import listen_pb2_grpc
from michi.serving.stage_cli import serve_model_stage

from .server import ListenServicer

serve_model_stage("listen", 50061, "michi.listen.v1.Listen", listen_pb2_grpc.add_ListenServicer_to_server,
                  lambda michi, executor, args: ListenServicer(michi, executor))
