"""The rectified-flow speak head: its loss at init is what the math says, and it learns a mixture."""
import math

import torch

from michi.config import MichiConfig, SpeakHeadConfig
from michi.model.speak_head import SpeakHead


def _head(latent_dim=2, cond_dim=4, width=128, blocks=3, steps=16) -> SpeakHead:
    cfg = MichiConfig(latent_dim=latent_dim,
                      speak_head=SpeakHeadConfig(width=width, num_blocks=blocks, euler_steps=steps, mlp_ratio=2,
                                                 temperature=1.0, cond_dropout=0.0))
    return SpeakHead(cfg, cond_dim=cond_dim)


def test_loss_at_init_is_second_moment_plus_one():
    """Output layer at zero => v_pred = 0 => loss = E[(x - noise)^2] = E[x^2] + 1 per dimension."""
    torch.manual_seed(0)
    head = _head(latent_dim=8)
    n = 200_000
    x = 0.5 + 1.5 * torch.randn(n, 8)  # E[x^2] = 0.25 + 2.25 = 2.5
    with torch.no_grad():
        loss = head.loss(x, torch.randn(n, 4), generator=torch.Generator().manual_seed(1))
    # standard error of the mean of (x - noise)^2 over 1.6M values is ~0.004
    assert abs(float(loss) - 3.5) < 0.03


def _mixture(cond: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """cond[:, 0] = 1: two modes at (-2, 0) and (2, 1); cond[:, 1] = 1: one mode at (0, -2)."""
    n = cond.shape[0]
    side = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    two = torch.stack([2 * side, (side + 1) / 2], dim=1)
    one = torch.tensor([0.0, -2.0]).expand(n, 2)
    centers = torch.where(cond[:, :1] > 0, two, one)
    return centers + 0.3 * torch.randn(n, 2, generator=gen)


def test_learns_a_conditional_2d_mixture():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    head = _head()
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    for _ in range(700):
        which = torch.randint(0, 2, (256,), generator=gen)
        cond = torch.nn.functional.one_hot(which, 4).float()
        loss = head.loss(_mixture(cond, gen), cond, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    for which in (0, 1):
        cond = torch.nn.functional.one_hot(torch.full((4000,), which), 4).float()
        got = head.sample(cond, generator=torch.Generator().manual_seed(2))
        want = _mixture(cond, torch.Generator().manual_seed(3))
        assert torch.allclose(got.mean(0), want.mean(0), atol=0.2), (which, got.mean(0), want.mean(0))
        assert torch.allclose(got.std(0), want.std(0), atol=0.25), (which, got.std(0), want.std(0))
        if which == 0:  # both modes, in the right proportion, not their average
            right = float((got[:, 0] > 0).float().mean())
            assert 0.4 < right < 0.6
            assert float((got[:, 0].abs() < 1).float().mean()) < 0.1


def test_sampler_temperature_and_guidance():
    torch.manual_seed(0)
    head = _head()
    with torch.no_grad():
        for p in head.parameters():  # a non-trivial velocity field
            p.add_(0.05 * torch.randn_like(p))
    cond = torch.randn(5, 4).repeat(2, 1)
    cold = head.sample(cond, temperature=0.0)
    assert torch.allclose(cold[:5], cold[5:])  # no noise: same condition, same latent
    warm = head.sample(cond, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(warm[:5], warm[5:])
    g = torch.Generator().manual_seed(0)
    plain = head.sample(cond, cfg_scale=1.0, generator=torch.Generator().manual_seed(4))
    guided = head.sample(cond, cfg_scale=3.0, generator=torch.Generator().manual_seed(4))
    assert guided.shape == plain.shape and torch.isfinite(guided).all()
    assert not torch.allclose(guided, plain)
    with torch.no_grad():
        assert math.isfinite(float(head.loss(torch.randn(8, 2), torch.randn(8, 4), generator=g)))
