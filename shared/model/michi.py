"""The whole model: backbone + text head, speak head, listen encoder + text head, vocoder."""
from __future__ import annotations

import torch
from torch import nn

from ..config import MichiConfig
from .backbone import Backbone
from .listen import ListenEncoder, ListenTextHead
from .speak_head import SpeakHead
from .vocoder import Vocoder


class LatentNorm(nn.Module):
    """Codec latents are normalised by stored statistics before the backbone and speak head see them."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.mean) / self.std

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.std + self.mean


class MichiModel(nn.Module):
    def __init__(self, cfg: MichiConfig, load_pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg, load_pretrained=load_pretrained)
        self.speak_head = SpeakHead(cfg)
        self.listen = ListenEncoder(cfg)
        self.listen_text = ListenTextHead(cfg, self.backbone.vocab.size)
        self.vocoder = Vocoder(cfg)
        self.latent_norm = LatentNorm(cfg.latent_dim)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (tied weights counted once) and the total."""
        counts = {name: _count(part) for name, part in self.named_children()}
        counts["total"] = _count(self)
        return counts


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() already yields tied ones once
