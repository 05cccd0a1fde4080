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

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
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

    def _modulations(self, c: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """(shift, scale, gate) of every block, then (shift, scale) of the output layer, for
        conditioning vectors c [..., W]."""
        mods = [block.modulation(c).chunk(3, dim=-1) for block in self.blocks]
        return mods + [self.final_modulation(c).chunk(2, dim=-1)]

    def _run(self, x_t: torch.Tensor, mods: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        h = self.input_proj(x_t)
        for block, (shift, scale, gate) in zip(self.blocks, mods):
            h = block(h, shift, scale, gate)
        shift, scale = mods[-1]
        return self.output(self.final_norm(h) * (1 + scale) + shift)

    def _condition(self, t: torch.Tensor, cond_proj: torch.Tensor) -> torch.Tensor:
        return cond_proj + self.time_mlp(timestep_embedding(t, self.cfg.width).to(cond_proj.dtype))

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t [N, D], t [N], cond [N, C] -> predicted velocity [N, D]."""
        return self._run(x_t, self._modulations(self._condition(t, self.cond_proj(cond))))

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
               cfg_scale: float | None = None, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """cond [N, C] -> latents [N, D] by Euler integration of the learned velocity field.
        All rows (all live calls) are sampled together: one batched network call per Euler step.
        `noise` [N, D], if given, is the starting point (already scaled by each row's temperature),
        so that each call can draw from its own generator."""
        steps = steps or self.cfg.euler_steps
        temperature = self.cfg.temperature if temperature is None else temperature
        cfg_scale = self.cfg.cfg_scale if cfg_scale is None else cfg_scale
        n = cond.shape[0]
        x = noise if noise is not None else temperature * torch.randn(
            n, self.latent_dim, generator=generator, device=cond.device, dtype=cond.dtype)
        guided = cfg_scale != 1.0
        if guided:  # conditional and unconditional rows in one call
            cond = torch.cat([cond, self.null_cond.to(cond.dtype).expand_as(cond)])
        # The conditioning of every Euler step depends on t and the hidden state only, not on x:
        # compute all steps' modulations in one batched call, so each weight matrix of the
        # modulation layers is read once per tick instead of once per step (the tiny head is
        # bound by memory bandwidth on CPU).
        t_grid = torch.arange(steps, device=cond.device, dtype=cond.dtype) / steps
        c_all = self._condition(t_grid[:, None], self.cond_proj(cond)[None])  # [steps, rows, W]
        mods_all = self._modulations(c_all)
        for i in range(steps):
            mods = [tuple(m[i] for m in block_mods) for block_mods in mods_all]
            if guided:
                v_cond, v_uncond = self._run(torch.cat([x, x]), mods).chunk(2)
                v = v_uncond + cfg_scale * (v_cond - v_uncond)
            else:
                v = self._run(x, mods)
            x = x + v / steps
        return x
