"""Causal streaming convs: chunked steps equal the offline conv, for any chunking."""
import pytest
import torch

from michi.model.conv import StreamingConv1d, StreamingConvTranspose1d


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def random_chunks(total, gen, high, with_empty=True):
    """Chunk lengths summing to total, 1..high each, with a few empty chunks thrown in."""
    sizes, left = [], total
    while left > 0:
        if with_empty and torch.rand((), generator=gen) < 0.1:
            sizes.append(0)
        size = min(left, int(torch.randint(1, high + 1, (), generator=gen)))
        sizes.append(size)
        left -= size
    return sizes


def stream(module, x, sizes):
    state = module.init_state(x.shape[0])
    outs, start = [], 0
    for size in sizes:
        y, state = module.step(x[..., start:start + size], state)
        outs.append(y)
        start += size
    return torch.cat(outs, dim=-1)


CONV_CASES = [  # (in, out, kernel, stride, dilation, length)
    (3, 5, 3, 1, 1, 97),
    (3, 5, 3, 1, 4, 97),  # dilated: the im2col path on CPU
    (4, 6, 12, 6, 1, 101),  # SEANet-style downsampling, T not a multiple of the stride
    (2, 3, 5, 2, 3, 64),  # strided and dilated
    (2, 3, 4, 4, 1, 50),  # K == stride: no pad, leftovers still carried
    (3, 3, 1, 1, 1, 40),  # 1x1, stateless in effect
    (16, 16, 3, 1, 1, 1930),  # large enough that ATen would pick oneDNN
]


@pytest.mark.parametrize("cin,cout,k,s,d,length", CONV_CASES)
def test_conv1d_chunked_equals_offline(cin, cout, k, s, d, length):
    torch.manual_seed(0)
    conv = StreamingConv1d(cin, cout, k, stride=s, dilation=d)
    x = torch.randn(2, cin, length)
    with torch.inference_mode():
        ref = conv(x)
        assert ref.shape == (2, cout, length // s)
        gen = torch.Generator().manual_seed(1)
        for high in (1, 3, 7, length):
            out = stream(conv, x, random_chunks(length, gen, high))
            assert out.shape == ref.shape
            assert rel_err(out, ref) < 1e-5, high


def test_conv1d_is_causal():
    torch.manual_seed(0)
    conv = StreamingConv1d(2, 3, 5, stride=2, dilation=2)
    x = torch.randn(1, 2, 40)
    y = x.clone()
    y[..., 30:] += 1.0
    a, b = conv(x), conv(y)
    # Output j ends at input sample 2j + 1, so outputs before 15 never see sample 30.
    torch.testing.assert_close(a[..., :15], b[..., :15])
    assert not torch.allclose(a[..., 15:], b[..., 15:])


@pytest.mark.parametrize("k,s,length", [(16, 8, 23), (10, 5, 17), (12, 6, 9), (4, 4, 11), (3, 2, 30)])
def test_conv_transpose_chunked_equals_offline(k, s, length):
    torch.manual_seed(0)
    conv = StreamingConvTranspose1d(4, 3, k, s)
    x = torch.randn(2, 4, length)
    with torch.inference_mode():
        ref = conv(x)
        assert ref.shape == (2, 3, length * s)
        gen = torch.Generator().manual_seed(2)
        for high in (1, 2, 5, length):
            out = stream(conv, x, random_chunks(length, gen, high))
            assert rel_err(out, ref) < 1e-5, high


def test_conv_transpose_is_causal():
    torch.manual_seed(0)
    conv = StreamingConvTranspose1d(2, 2, 10, 5)
    x = torch.randn(1, 2, 8)
    y = x.clone()
    y[..., 4] += 1.0
    a, b = conv(x), conv(y)
    torch.testing.assert_close(a[..., :20], b[..., :20])
    assert not torch.allclose(a[..., 20:25], b[..., 20:25])


@pytest.mark.parametrize("make", [lambda: StreamingConv1d(3, 4, 3, dilation=2),
                                  lambda: StreamingConv1d(3, 4, 8, stride=4),
                                  lambda: StreamingConvTranspose1d(3, 4, 8, 4)])
def test_reset_row_restarts_that_stream_only(make):
    torch.manual_seed(0)
    conv = make()
    first, second = torch.randn(3, 3, 16), torch.randn(3, 3, 12)
    with torch.inference_mode():
        state = conv.init_state(3)
        conv.step(first, state)
        state.reset(torch.tensor([False, True, False]))
        out, _ = conv.step(second, state)
        fresh, _ = conv.step(second[1:2], conv.init_state(1))
        carried = conv(torch.cat([first, second], -1))[..., -out.shape[-1]:]
    torch.testing.assert_close(out[1:2], fresh)
    torch.testing.assert_close(out[[0, 2]], carried[[0, 2]])


def test_reset_mid_stride_is_refused():
    conv = StreamingConv1d(1, 1, 8, stride=4)
    state = conv.init_state(2)
    conv.step(torch.randn(2, 1, 6), state)
    with pytest.raises(ValueError, match="mid-stride"):
        state.reset(torch.tensor([True, False]))


def test_step_supports_autograd():
    torch.manual_seed(0)
    conv = StreamingConv1d(2, 2, 3, dilation=3)
    x = torch.randn(1, 2, 20, requires_grad=True)
    out = stream(conv, x, [5, 7, 8])
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and conv.weight.grad.abs().sum() > 0
