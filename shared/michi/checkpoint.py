"""One checkpoint format for the whole model: a directory with `config.json` and `model.safetensors`.

config.json holds the format version, the full MichiConfig, what the weights are (trained or not,
by what) and the SHA-256 of the weights file, so a truncated, corrupt or mismatched file is refused
with a message that says which one it is, instead of loading garbage.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import MichiConfig
from .model.michi import MichiModel

FORMAT = "michi-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INT8_SCALE = ".int8_scale"  # beside an int8-stored tensor: its scale per output row
TOKENIZER_DIR = "tokenizer"  # a Hugging Face tokenizer travels inside the checkpoint
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why and what to do."""


def _stored_state(model: MichiModel) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of the model's state dict: tied tensors (e.g. embeddings = LM head)
    once, under their first name, and no weights a package supplies (`MichiModel.packaged_keys`)."""
    seen: set[int] = set()
    out = {}
    packaged = model.packaged_keys()
    for name, tensor in model.state_dict().items():
        if name.startswith(packaged):
            continue
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel() > 0:
            continue
        seen.add(ptr)
        out[name] = tensor
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def quantize_int8(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Each floating-point matrix or conv kernel under `prefixes` -> int8, with one float32 scale
    per output row beside it (`<key>` + INT8_SCALE); `dequantize_int8` undoes it."""
    out = dict(tensors)
    for k, v in tensors.items():
        if k.startswith(prefixes) and v.is_floating_point() and v.dim() >= 2:
            w = v.float()
            scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp(min=1e-12) / 127
            out[k] = (w / scale).round().clamp(-127, 127).to(torch.int8)
            out[k + INT8_SCALE] = scale.flatten()
    return out


def dequantize_int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in tensors.items() if not k.endswith(INT8_SCALE)}
    for k, scale in tensors.items():
        if k.endswith(INT8_SCALE):
            base = k.removesuffix(INT8_SCALE)
            q = tensors[base]
            out[base] = q.float() * scale.float().view(-1, *([1] * (q.dim() - 1)))
    return out


def save_checkpoint(model: MichiModel, path: str | Path, info: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None, int8: tuple[str, ...] = ()) -> Path:
    """Write `path/config.json` and `path/model.safetensors`. `info` says what the weights are;
    `info["trained"]` must be True only for weights this project's training code produced.
    `dtype` (e.g. torch.float16) stores the floating-point weights smaller; loading casts them back
    to the model's dtype. The latent statistics (and a mel-PCA basis) always stay float32.
    `int8`: state-dict key prefixes whose matrices are stored as int8 with a scale per row."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = path / WEIGHTS_FILE
    tensors = {k: v.detach().contiguous().cpu() for k, v in _stored_state(model).items()}
    if dtype is not None:
        exact = model.full_precision_keys()
        tensors = {k: v.to(dtype) if v.is_floating_point() and not k.startswith(exact) else v
                   for k, v in tensors.items()}
    tensors = quantize_int8(tensors, int8)
    save_file(tensors, str(weights), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    config = model.cfg.to_dict()
    config["backbone"]["hf_path"] = None  # the weights are all here now
    tokenizer = config["backbone"]["tokenizer"]
    if tokenizer != "bytes":
        (path / TOKENIZER_DIR).mkdir(exist_ok=True)
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copyfile(Path(tokenizer) / name, path / TOKENIZER_DIR / name)
        config["backbone"]["tokenizer"] = TOKENIZER_DIR  # relative to the checkpoint
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "info": {"trained": False, **(info or {})},
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights)},
    }
    (path / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return path


def read_checkpoint_config(path: str | Path) -> tuple[MichiConfig, dict[str, Any]]:
    """Parse and check `config.json`; returns the config and the info block."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: missing {CONFIG_FILE}; a Michi checkpoint is a directory with "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        doc = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: not a Michi checkpoint (format is {doc.get('format')!r} "
                              f"where {FORMAT!r} was expected)" if isinstance(doc, dict)
                              else f"{cfg_file}: not a Michi checkpoint")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: format version {doc.get('format_version')!r} is not supported "
                              f"(this Michi reads version {FORMAT_VERSION})")
    try:
        cfg = MichiConfig.from_dict(doc["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: invalid model config ({e})") from None
    if cfg.backbone.tokenizer == TOKENIZER_DIR:
        cfg.backbone.tokenizer = str(path / TOKENIZER_DIR)
    return cfg, {**doc.get("info", {}), "sha256": doc.get("weights", {}).get("sha256")}


TEXT_HEAD = "listen_text."
LEGACY_TEXT_CONV = TEXT_HEAD + "conv."


def listen_text_trained(cfg: MichiConfig, info: dict[str, Any]) -> bool:
    """Whether training reached the listen text head: a learned codec trains it with the codec; a
    mel-PCA model's info says so (`listen_text_trained`, set by the recipe's hearing stage)."""
    return bool(info.get("listen_text_trained", cfg.codec == "learned"))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    verify_hash: bool = True) -> tuple[MichiModel, dict[str, Any]]:
    path = Path(path)
    cfg, info = read_checkpoint_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_FILE}")
    if verify_hash and info.get("sha256") and sha256_file(weights) != info["sha256"]:
        raise CheckpointError(f"{weights}: SHA-256 does not match {CONFIG_FILE}; the file is corrupt, "
                              f"truncated or from another checkpoint")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    tensors = dequantize_int8(tensors)
    model = MichiModel(cfg, load_pretrained=False)
    expected = _stored_state(model)
    # The conv-only text head (`ListenConfig.text_layers` 0) held its conv as `conv`, now the
    # first layer of its front.
    tensors = {k.replace(LEGACY_TEXT_CONV, TEXT_HEAD + "front.0.", 1) if k.startswith(LEGACY_TEXT_CONV) else k: v
               for k, v in tensors.items()}
    if not listen_text_trained(cfg, info):
        # A head no training reached holds random weights, perhaps of an older design of the
        # head: the model's own fresh head stands in for it (muted until trained, as before).
        tensors = {k: v for k, v in tensors.items() if not k.startswith(TEXT_HEAD)}
        expected = {k: v for k, v in expected.items() if not k.startswith(TEXT_HEAD)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensors have the wrong shape for this config ({'; '.join(wrong[:3])})")
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if problems:
        raise CheckpointError(f"{weights} does not match its config (preset {cfg.preset!r}): "
                              + "; ".join(problems))
    model.load_state_dict(tensors, strict=False)  # strict is checked above, tied aliases aside
    return model.to(device).eval(), info
