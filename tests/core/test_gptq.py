import torch
import torch.nn.functional as F

from yoloq.core.functional import fake_quantize
from yoloq.core.gptq import HessianAccumulator, gptq_latent, gptq_round


def _layer():
    """A conv, its inputs, its weights as rows, their per-row 4-bit steps, and the inputs' Hessian."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 16, 3, padding=1)
    x = torch.randn(4, 32, 16, 16) * torch.linspace(0.1, 3, 32)[None, :, None, None]
    x = x + 0.5 * x.roll(1, 1)  # correlated channels of unequal power, as real feature maps
    acc = HessianAccumulator(conv)
    acc.add(x)
    w = conv.weight.detach().reshape(16, -1)
    return conv, x, w, w.abs().amax(1) / 7, acc.hessian()


def test_gptq_lowers_output_error_and_stays_on_the_grid():
    conv, x, w, s, h = _layer()
    rtn = fake_quantize(w, s[:, None], torch.zeros(16, 1), -8, 7)
    g = gptq_round(w, h, s, -8, 7)

    def err(q):
        return (F.conv2d(x, q.reshape_as(conv.weight)) - F.conv2d(x, conv.weight)).pow(2).mean()

    assert err(g) < 0.9 * err(rtn)
    codes = g / s[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= -8 and codes.round().max() <= 7


def test_hessian_matches_im2col_second_moment_and_subsamples():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    acc = HessianAccumulator(conv, max_positions=10_000)
    acc.add(x)
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    assert torch.allclose(acc.hessian(), cols.T @ cols / cols.shape[0], atol=1e-5)
    small = HessianAccumulator(conv, max_positions=7)
    small.add(x)
    assert small.n == 7


def test_latent_weights_round_to_gptq_and_keep_their_distance_to_the_grid():
    _, _, w, s, h = _layer()
    lat = gptq_latent(w, h, s, -8, 7)
    assert torch.equal(fake_quantize(lat, s[:, None], torch.zeros(16, 1), -8, 7), gptq_round(w, h, s, -8, 7))
    frac = (lat / s[:, None]) % 1
    assert ((frac > 0.05) & (frac < 0.95)).float().mean() > 0.5  # off the grid: a learned rounding can start there
    assert torch.equal(lat[:, 0], w[:, 0])  # the first column has no earlier errors to take in
