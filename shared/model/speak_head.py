"""Speak head: rectified flow matching from the backbone hidden state to the next audio latent.

Training: x_t = (1 - t) * noise + t * x, target velocity v = x - noise, t ~ logit-normal.
Sampling: start from temperature * noise at t=0 and take N Euler steps to t=1.
The network is an MLP of residual blocks modulated by adaLN (MAR / VibeVoice style); the output
layer starts at zero, so at init v_pred = 0 and the loss is exactly E[(x - noise)^2] = E[x^2] + 1
per dimension (a fact the tests check).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import MichiConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = (t * 1000.0).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaLNBlock(nn.Module):
    def __init__(self, width: int, mlp_ratio: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width * mlp_ratio), nn.SiLU(), nn.Linear(width * mlp_ratio, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class SpeakHead(nn.Module):
    def __init__(self, cfg: MichiConfig, cond_dim: int | None = None):
        super().__init__()
        s = cfg.speak_head
        self.cfg = s
        self.latent_dim = cfg.latent_dim
        cond_dim = cond_dim or cfg.backbone.hidden_size
        w = s.width
        self.input_proj = nn.Linear(cfg.latent_dim, w)
        self.cond_proj = nn.Linear(cond_dim, w)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(AdaLNBlock(w, s.mlp_ratio) for _ in range(s.num_blocks))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.output = nn.Linear(w, cfg.latent_dim)
        for layer in (self.final_modulation[1], self.output):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # The "unconditional" condition, used for condition dropout and classifier-free guidance.
        self.null_cond = nn.Parameter(torch.zeros(cond_dim))

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                 cond_proj: torch.Tensor | None = None) -> torch.Tensor:
        """x_t [N, D], t [N], cond [N, C] -> predicted velocity [N, D]. `cond_proj` is
        cond_proj(cond) when the caller already has it (the same for every Euler step)."""
        if cond_proj is None:
            cond_proj = self.cond_proj(cond)
        c = cond_proj + self.time_mlp(timestep_embedding(t, self.cfg.width).to(x_t.dtype))
        h = self.input_proj(x_t)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return self.output(self.final_norm(h) * (1 + scale) + shift)

    def loss(self, x: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Rectified-flow loss for targets x [N, D] given conditions cond [N, C]."""
        n = x.shape[0]
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        t = torch.sigmoid(torch.randn(n, generator=generator, device=x.device, dtype=x.dtype))
        if self.training and self.cfg.cond_dropout > 0:
            drop = torch.rand(n, generator=generator, device=x.device) < self.cfg.cond_dropout
            cond = torch.where(drop.unsqueeze(-1), self.null_cond.to(cond.dtype).expand_as(cond), cond)
        x_t = (1 - t).unsqueeze(-1) * noise + t.unsqueeze(-1) * x
        return (self.velocity(x_t, t, cond) - (x - noise)).pow(2).mean()

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int | None = None, temperature: float | None = None,
               cfg_scale: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """cond [N, C] -> latents [N, D] by Euler integration of the learned velocity field.
        All rows (all live calls) are sampled together: one batched network call per Euler step."""
        steps = steps or self.cfg.euler_steps
        temperature = self.cfg.temperature if temperature is None else temperature
        cfg_scale = self.cfg.cfg_scale if cfg_scale is None else cfg_scale
        n = cond.shape[0]
        x = temperature * torch.randn(n, self.latent_dim, generator=generator, device=cond.device, dtype=cond.dtype)
        guided = cfg_scale != 1.0
        if guided:  # conditional and unconditional rows in one call
            cond = torch.cat([cond, self.null_cond.to(cond.dtype).expand_as(cond)])
        cond_proj = self.cond_proj(cond)
        dt = 1.0 / steps
        for i in range(steps):
            if guided:
                t = torch.full((2 * n,), i * dt, device=cond.device, dtype=cond.dtype)
                v_cond, v_uncond = self.velocity(torch.cat([x, x]), t, cond, cond_proj).chunk(2)
                v = v_uncond + cfg_scale * (v_cond - v_uncond)
            else:
                t = torch.full((n,), i * dt, device=cond.device, dtype=cond.dtype)
                v = self.velocity(x, t, cond, cond_proj)
            x = x + dt * v
        return x
