"""Metrics: known values, mask recovery, and LPIPS both offline (null + one warning) and with a backbone."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from dia import metrics as M


def test_image_metrics_on_known_inputs():
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(M.ssim(x, x), torch.ones(3))
    y = (x + 0.1).clamp(0, 1)
    mse01 = (x - y).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(M.psnr(y, x), 10 * torch.log10(1 / mse01))
    torch.testing.assert_close(M.mse(y, x), mse01)
    assert (M.ssim(torch.rand(3, 1, 28, 28), x) < 0.2).all()


def test_mask_recovery_counts_rounded_entries_per_problem():
    true = {"a": torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])}
    got = {"a": torch.tensor([[0.9, 0.2, 0.4, 1.0], [0.1, 0.7, 0.6, 0.5]])}
    torch.testing.assert_close(M.mask_recovery(got, true), torch.tensor([0.75, 0.75]))


def test_lpips_offline_is_null_with_one_clear_warning(monkeypatch):
    import lpips

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    monkeypatch.setattr(M, "_lpips_cache", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert M.load_lpips("alex") is None
        assert M.load_lpips("alex") is None  # cached: no second warning
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "LPIPS disabled" in msgs[0] and "null" in msgs[0]


def test_lpips_plumbing_with_injected_random_backbone():
    """The real lpips package and its linear heads, with a randomly initialised AlexNet injected (no download)."""
    import lpips

    torch.manual_seed(0)
    net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    fn = M.lpips_from_network(net)
    x = torch.rand(2, 1, 28, 28)  # grayscale and below AlexNet's minimum size: expanded and upsampled
    same, other = fn(x, x), fn(x, torch.rand(2, 1, 28, 28))
    assert same.shape == (2,) and torch.allclose(same, torch.zeros(2), atol=1e-6)
    assert (other > 0).all() and all(math.isfinite(v) for v in other.tolist())


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (1, 3, 224, 224)])
def test_lpips_wrapper_accepts_colour_sizes(shape):
    import lpips

    fn = M.lpips_from_network(lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval())
    assert fn(torch.rand(shape), torch.rand(shape)).shape == (1,)
