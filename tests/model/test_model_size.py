"""Parameter budgets: `full` is the seed's ~530M, `tiny` a few million."""
import torch

from michi.config import full, tiny
from michi.model.michi import MichiModel


def _counts(cfg):
    with torch.device("meta"):
        return MichiModel(cfg, load_pretrained=False).parameter_counts()


def test_full_counts_530m_within_5_percent():
    counts = _counts(full())
    assert abs(counts["total"] - 530e6) / 530e6 < 0.05, counts
    # SmolLM2-360M shape, stream-token rows and latent projections included
    assert 360e6 < counts["backbone"] < 365e6, counts
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]


def test_tiny_is_a_few_million():
    counts = _counts(tiny())
    assert 1e6 < counts["total"] < 15e6, counts
