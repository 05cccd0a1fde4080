"""The backbone: cached tick-by-tick stepping equals one full forward, text-only positions included."""
import pytest
import torch
from transformers import LlamaForCausalLM

from michi.config import tiny
from michi.model.backbone import Backbone, backbone_config_from_hf, llama_config


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _random_positions(backbone: Backbone, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A call as the session builds it: ticks, with text-only runs (prompts, tool results) between."""
    cfg = backbone.cfg
    vocab = backbone.vocab
    groups = []
    for i in range(12):
        if i % 4 == 1:  # a text-only run of 1..6 tokens, stream tokens included
            n = int(torch.randint(1, 7, (1,), generator=gen))
            ids = torch.randint(0, vocab.size, (batch, n), generator=gen)
            groups.append(backbone.embed_text(ids))
        else:
            latent_dim = backbone.agent_latent_in.in_features
            user_text = torch.randint(-1, vocab.base, (batch, 3), generator=gen)
            groups.append(backbone.embed_tick(torch.randint(0, vocab.size, (batch,), generator=gen),
                                              torch.randn(batch, latent_dim, generator=gen),
                                              torch.randn(batch, latent_dim, generator=gen), user_text))
    assert cfg.hidden_size == groups[0].shape[-1]
    return groups


@pytest.mark.parametrize("batch", [1, 3])
def test_cached_stepping_equals_full_forward(batch):
    torch.manual_seed(0)
    backbone = Backbone(tiny()).eval()
    gen = torch.Generator().manual_seed(batch)
    with torch.inference_mode():
        groups = _random_positions(backbone, batch, gen)
        full = backbone(torch.cat(groups, dim=1))
        state = backbone.init_state(rows=batch)
        stepped = torch.cat([backbone(g, state) for g in groups], dim=1)
    assert state.length == full.shape[1] == sum(g.shape[1] for g in groups)
    assert _rel(stepped, full) < 1e-5


def test_text_only_positions_change_later_ticks():
    """The equality above is not vacuous: dropping the text-only runs changes the ticks after them."""
    torch.manual_seed(0)
    backbone = Backbone(tiny()).eval()
    with torch.inference_mode():
        groups = _random_positions(backbone, 1, torch.Generator().manual_seed(0))
        full = backbone(torch.cat(groups, dim=1))
        state = backbone.init_state()
        ticks_only = [backbone(g, state) for i, g in enumerate(groups) if i % 4 != 1]
    last_tick_full, last_tick_without_text = full[:, -1], ticks_only[-1][:, -1]
    assert _rel(last_tick_without_text, last_tick_full) > 1e-2


def test_kv_cache_grows_past_its_first_buffer():
    torch.manual_seed(0)
    backbone = Backbone(tiny()).eval()
    x = torch.randn(1, 150, backbone.hidden_size)
    with torch.inference_mode():
        full = backbone(x)
        state = backbone.init_state()
        stepped = torch.cat([backbone(x[:, i:i + 1], state) for i in range(150)], dim=1)
    assert state.cache.keys[0].shape[-2] >= 150  # reallocated at least once (starts at 64)
    assert _rel(stepped, full) < 1e-5


def test_tick_fusion_sums_streams():
    torch.manual_seed(0)
    backbone = Backbone(tiny()).eval()
    v, d = backbone.vocab, backbone.agent_latent_in.in_features
    zero = torch.zeros(1, d)
    with torch.no_grad():
        none = torch.full((1, 3), -1)
        silent = backbone.embed_tick(torch.tensor([v.pad]), zero, zero, none)
        expected = (backbone.stream_embed.weight[0] + backbone.agent_latent_in.bias + backbone.user_latent_in.bias)
        assert torch.allclose(silent[0, 0], expected, atol=1e-6)
        one_user_token = backbone.embed_tick(torch.tensor([v.pad]), zero, zero, torch.tensor([[65, -1, -1]]))
        diff = one_user_token - silent
        assert torch.allclose(diff[0, 0], backbone.lm.model.embed_tokens.weight[65] + backbone.user_text_tag, atol=1e-6)
    # stream tokens use their own rows, base tokens the (pretrained) table
    ids = torch.tensor([[0, v.base - 1, v.pad, v.eos]])
    emb = backbone.embed_text(ids)
    assert torch.equal(emb[0, 1], backbone.lm.model.embed_tokens.weight[v.base - 1])
    assert torch.equal(emb[0, 3], backbone.stream_embed.weight[v.eos - v.base])
    assert backbone.text_logits(emb).shape[-1] == v.size


def test_without_agent_feedback_the_agent_latent_is_not_read():
    cfg = tiny()
    cfg.agent_feedback = False
    torch.manual_seed(0)
    backbone = Backbone(cfg).eval()
    assert backbone.agent_latent_in is None
    none, d = torch.full((2, 3), -1), cfg.latent_dim
    with torch.no_grad():
        a = backbone.embed_tick(torch.tensor([5, 7]), torch.zeros(2, d), torch.ones(2, d), none)
        b = backbone.embed_tick(torch.tensor([5, 7]), torch.randn(2, d), torch.ones(2, d), none)
        c = backbone.embed_tick(torch.tensor([5, 7]), torch.zeros(2, d), torch.randn(2, d), none)
    assert torch.equal(a, b) and not torch.allclose(a, c)  # the user latent is still heard


def test_loads_local_hugging_face_checkpoint(tmp_path):
    cfg = tiny()
    torch.manual_seed(1)
    hf = LlamaForCausalLM(llama_config(cfg.backbone))
    hf.save_pretrained(tmp_path)
    cfg.backbone = backbone_config_from_hf(tmp_path)
    assert cfg.backbone.hidden_size == 256 and cfg.backbone.num_layers == 4 and cfg.backbone.tokenizer == "bytes"
    backbone = Backbone(cfg)
    assert torch.equal(backbone.lm.model.layers[2].mlp.up_proj.weight, hf.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(backbone.lm.lm_head.weight, hf.model.embed_tokens.weight)  # still tied


def test_rejects_non_llama_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(ValueError, match="not a Llama-family"):
        backbone_config_from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        backbone_config_from_hf(tmp_path / "nowhere")


def test_batched_rows_at_different_lengths_equal_each_call_alone():
    """One forward carries the ticks of several calls, each at its own position; text prefilled
    into one row and rows that sit a tick out change nothing for the others."""
    torch.manual_seed(0)
    backbone = Backbone(tiny()).eval()
    gen = torch.Generator().manual_seed(5)
    hidden = backbone.hidden_size
    calls = [[], [], []]  # every position each call has seen
    with torch.inference_mode():
        state = backbone.init_state(rows=3)
        prompt = backbone.embed_text(torch.randint(0, 256, (1, 7), generator=gen))
        backbone.cached_forward(prompt, state.cache, row=1)
        calls[1].append(prompt)
        for step in range(6):
            x = torch.randn(3, 1, hidden, generator=gen)
            advance = torch.tensor([True, True, step % 2 == 0])  # call 2 ticks every other round
            out = backbone.cached_forward(x, state.cache, advance=advance)
            for row in range(3):
                if advance[row]:
                    calls[row].append(x[row:row + 1])
                    alone = backbone(torch.cat(calls[row], dim=1))[:, -1]
                    assert _rel(out[row:row + 1, -1], alone) < 1e-5, (step, row)
    assert state.cache.lengths.tolist() == [6, 13, 3]
