"""One checkpoint format: round trip, and clear refusals of corrupt or mismatched files."""
import json

import pytest
import torch

from michi.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from michi.config import tiny
from michi.model.michi import MichiModel


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = MichiModel(tiny())
    with torch.no_grad():
        model.latent_norm.std.fill_(2.0)  # buffers travel too
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny", info={"note": "random init"})
    return model, path


def test_half_precision_storage(saved, tmp_path):
    model, full_path = saved
    path = save_checkpoint(model, tmp_path / "half", dtype=torch.float16)
    size = lambda p: (p / "model.safetensors").stat().st_size
    assert size(path) < 0.55 * size(full_path)
    loaded, _ = load_checkpoint(path)
    for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert got.dtype == want.dtype, name  # back in the model's dtype
        if name.startswith("latent_norm."):
            assert torch.equal(got, want), name  # statistics stay exact
        else:
            assert torch.allclose(got, want, rtol=1e-3, atol=1e-4), name


def test_int8_storage_of_the_listen_text_head(saved, tmp_path):
    model, _ = saved
    half = save_checkpoint(model, tmp_path / "half", dtype=torch.float16)
    small = save_checkpoint(model, tmp_path / "int8", dtype=torch.float16, int8=("listen_text.",))
    size = lambda p: (p / "model.safetensors").stat().st_size
    head_bytes = sum(v.numel() * 2 for k, v in model.state_dict().items() if k.startswith("listen_text."))
    assert size(half) - size(small) > 0.4 * head_bytes  # most of the head's bytes halve
    loaded, _ = load_checkpoint(small)
    for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert got.dtype == want.dtype, name
        if name.startswith("listen_text.") and want.dim() >= 2:
            row_max = want.abs().flatten(1).amax(1).view(-1, *[1] * (want.dim() - 1))
            assert ((got - want).abs() <= row_max / 127 * 0.5 + 1e-3 * row_max).all(), name  # half a step
            assert not torch.equal(got, want.half().float()), name  # stored as int8 indeed
        else:
            assert torch.allclose(got, want, rtol=1e-3, atol=1e-4), name


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_round_trip(saved):
    model, path = saved
    loaded, info = load_checkpoint(path)
    assert info["trained"] is False and info["note"] == "random init"
    assert loaded.cfg == model.cfg
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    lm = loaded.backbone.lm
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()  # still tied


def test_corrupt_weights_are_refused(saved, tmp_path):
    _, path = saved
    bad = _copy(path, tmp_path / "bad")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        load_checkpoint(bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(bad, verify_hash=False)


def test_wrong_shape_is_refused(saved, tmp_path):
    _, path = saved
    other = _copy(path, tmp_path / "other")
    doc = json.loads((other / "config.json").read_text())
    doc["config"]["speak_head"]["width"] = 128  # the weights were written at width 256
    (other / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"wrong shape .*speak_head"):
        load_checkpoint(other)


def test_bad_config_files_are_refused(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "missing")
    ckpt = _copy(path, tmp_path / "c")
    cases = [("{not json", "not valid JSON"),
             (json.dumps({"format": "something-else"}), "not a Michi checkpoint"),
             (json.dumps({"format": "michi-checkpoint", "format_version": 99}), "format version 99"),
             (json.dumps({"format": "michi-checkpoint", "format_version": 1, "config": {"latent_dims": 3}}),
              "unknown config key 'latent_dims'")]
    for text, message in cases:
        (ckpt / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_checkpoint(ckpt)


def test_hugging_face_backbone_and_tokenizer_travel_in_the_checkpoint(tmp_path):
    """A backbone from a local HF checkpoint (here a small one made on the spot, with a BPE
    tokenizer trained by the `tokenizers` library) round-trips, tokenizer included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    import michi
    from michi.model.backbone import llama_config

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["hello world, the shop opens at nine"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_dir = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(hf_dir)
    cfg = tiny()
    cfg.backbone.vocab_size = 320
    LlamaForCausalLM(llama_config(cfg.backbone)).save_pretrained(hf_dir)

    model = michi.load("tiny", backbone=hf_dir)
    assert model.tokenizer.decode(model.tokenizer.encode("hello world")) == "hello world"
    assert len(model.tokenizer.encode("hello world")) < len("hello world")  # real BPE merges
    ckpt = save_checkpoint(model.model, tmp_path / "ckpt")
    (hf_dir / "tokenizer.json").unlink()  # the checkpoint must not depend on the HF directory
    loaded = michi.load(ckpt)
    assert loaded.tokenizer.encode("hello world") == model.tokenizer.encode("hello world")
    assert loaded.cfg.backbone.vocab_size == 320 and loaded.cfg.backbone.hf_path is None
