"""The generated gRPC code is what `python -m michi.proto.build` makes from protos/ today."""
import shutil

from michi.proto import build


def test_generated_code_is_not_stale():
    assert build.stale() == [], "run `python -m michi.proto.build` and commit the result"


def test_staleness_is_detected(tmp_path):
    copy = tmp_path / "proto"
    shutil.copytree(build.HERE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "gateway" / "v1" / "gateway_pb2.py").write_text("# edited by hand\n")
    (copy / "vocoder" / "v1" / "vocoder_pb2.pyi").unlink()
    assert build.stale(copy) == ["missing vocoder/v1/vocoder_pb2.pyi", "differs gateway/v1/gateway_pb2.py"]
