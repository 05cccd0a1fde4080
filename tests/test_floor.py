"""The tick floor (michi bench --floor): its FLOP and byte counts agree with the model itself."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from michi.config import preset
from michi.floor import GPUS, part_sizes, tick_floor
from michi.model.michi import MichiModel


def test_backbone_flops_and_kv_bytes_match_the_real_forward():
    """Counted FLOPs of a real batched tick (tiny backbone + text head, B calls at C positions)
    equal the floor's projection term; the KV cache grows by the floor's bytes per position."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    backbone = MichiModel(cfg).eval().backbone
    batch, context = 4, 40
    with torch.inference_mode():
        cache = backbone.init_state(batch).cache
        backbone.cached_forward(torch.randn(batch, context, cfg.backbone.hidden_size), cache)
        with FlopCounterMode(display=False) as counter:
            hidden = backbone.cached_forward(torch.randn(batch, 1, cfg.backbone.hidden_size), cache)
            backbone.text_logits(hidden[:, -1])
            backbone.agent_latent_in(torch.zeros(batch, cfg.latent_dim))
            backbone.user_latent_in(torch.zeros(batch, cfg.latent_dim))
    backbone_floor = tick_floor(cfg, batch, context + 1, GPUS["H100 SXM"])["parts"]["backbone"]
    # The counter sees the matrix products (it has no rule for CPU attention): they match the
    # projection term up to norm weights and biases, which the floor counts as matmul weights.
    counted = counter.get_total_flops()
    assert 0 <= backbone_floor["projection_flops"] - counted < 0.002 * counted
    floor = tick_floor(cfg, batch, context + 1, GPUS["H100 SXM"])
    fp16_per_position = sum(k[:, :, 0].numel() + v[:, :, 0].numel() for k, v in zip(cache.keys, cache.values)) // batch * 2
    assert floor["kv_bytes_per_position"] == fp16_per_position


def test_floor_grows_with_calls_and_context_and_names_its_bound():
    cfg = preset("full")
    sizes = part_sizes(cfg)
    gpu = GPUS["RTX 4090"]
    one, many, long = (tick_floor(cfg, b, c, gpu, sizes) for b, c in ((1, 750), (64, 750), (64, 3750)))
    assert one["tick_floor_ms"] < many["tick_floor_ms"] < long["tick_floor_ms"]
    # the speak head's weights are read once per Euler step, whatever the batch
    assert one["parts"]["speak_head"]["bytes"] == many["parts"]["speak_head"]["bytes"] == (
        2 * sizes["params"]["speak_head"] * cfg.speak_head.euler_steps)
    assert long["parts"]["backbone"]["bound"] == "memory"  # the KV cache of 64 five-minute calls
