"""The committed Triton model repository (deploy/triton) and the compose override that runs the
listen encoder and vocoder steps on Triton. The server itself is tested in tests/services/test_triton.py."""
import pytest
import yaml
from deploy_support import DEPLOY
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import michi
from michi.serving.triton.export import MODELS, TRITON_TYPES, config_pbtxt, step_spec

REPOSITORY = DEPLOY / "triton-models"


@pytest.mark.parametrize("stage", MODELS)
def test_committed_config_is_current_and_a_valid_triton_config(stage):
    """The config.pbtxt files are what `michi triton export` writes for the default model (a stale
    one fails here: run `michi triton export --config-only`), and parse as Triton ModelConfig."""
    spec = step_spec(michi.load("default"), stage)
    text = (REPOSITORY / spec.model / "config.pbtxt").read_text()
    assert text == config_pbtxt(spec, "onnxruntime", max_batch_size=64, queue_delay_us=500)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == spec.model and config.backend == "onnxruntime" and config.max_batch_size == 64
    assert [t.name for t in config.input] == [t.name for t in spec.inputs]
    assert [t.name for t in config.output] == [t.name for t in spec.outputs]
    for tensor, want in zip(config.input, spec.inputs):
        assert model_config_pb2.DataType.Name(tensor.data_type) == TRITON_TYPES[want.dtype]
        assert tuple(tensor.dims) == want.dims and all(d >= 1 for d in tensor.dims)
    states = [t.name for t in config.input if t.name.startswith("state_in_")]
    assert [n.replace("state_in_", "state_out_") for n in states] == [
        t.name for t in config.output if t.name.startswith("state_out_")]


def test_compose_override_puts_listen_and_vocoder_on_triton():
    override = yaml.safe_load((DEPLOY / "docker-compose.triton.yml").read_text())["services"]
    base = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    triton = override["triton"]
    mount = next(v for v in triton["volumes"] if v.endswith(":/models:ro"))
    assert (DEPLOY / mount.split(":")[0]).resolve() == REPOSITORY.resolve()
    assert "--model-repository=/models" in triton["command"]
    for stage in ("listen", "vocoder"):
        assert stage in base
        env = override[stage]["environment"]
        assert env["MICHI_EXECUTION"] == "triton" and env["MICHI_TRITON_URL"] == "triton:8001"
        assert override[stage]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "backbone" not in override  # the backbone stays in its own process (batched KV cache)


def test_export_command_writes_the_committed_configs(tmp_path):
    from michi.cli import main

    assert main(["triton", "export", "--config-only", "--out", str(tmp_path)]) == 0
    for model in MODELS.values():
        assert (tmp_path / model / "config.pbtxt").read_text() == (REPOSITORY / model / "config.pbtxt").read_text()
