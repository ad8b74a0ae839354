"""Metrics: known values, mask measures and their baselines, and LPIPS both offline (null + one warning) and with a
backbone."""

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


def test_mask_measures_count_dropped_units_per_problem_and_part():
    # problem 0: units 1 (a) and 5 (b) dropped; predicted dropped (< 0.5): 1 and 4 -> 1 hit, 1 false alarm
    # problem 1: units 0, 1 (a) and 5 (b) dropped; predicted dropped: 0 and 5 -> 2 hits, no false alarm
    true = {
        "a": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]),
        "b": torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]),
    }
    got = {"a": torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.7, 0.6]]), "b": torch.tensor([[0.8, 0.3, 0.5], [0.5, 0.9, 0.2]])}
    out = M.mask_measures(got, true, {"a": "attention", "b": "mlp"}, {"a": 0.5, "b": 0.25})
    torch.testing.assert_close(out["mask_recall"], torch.tensor([1 / 2, 2 / 3]))
    torch.testing.assert_close(out["mask_precision"], torch.tensor([1 / 2, 1.0]))
    torch.testing.assert_close(out["mask_bal_acc"], torch.tensor([(1 / 2 + 3 / 4) / 2, (2 / 3 + 1) / 2]))
    torch.testing.assert_close(out["mask_accuracy"], torch.tensor([4 / 6, 5 / 6]))
    torch.testing.assert_close(out["mask_bal_acc_attention"], torch.tensor([1.0, (1 / 2 + 1) / 2]))
    torch.testing.assert_close(out["mask_bal_acc_mlp"], torch.tensor([(0 + 1 / 2) / 2, 1.0]))
    # keeping everything finds nothing: balanced accuracy exactly 0.5, accuracy = the kept share, precision undefined
    torch.testing.assert_close(out["mask_bal_acc_keep_all"], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(out["mask_accuracy_keep_all"], torch.tensor([4 / 6, 3 / 6]))
    assert out["mask_recall_keep_all"].eq(0).all() and out["mask_precision_keep_all"].isnan().all()
    assert set(M.MASK_KEYS) <= set(out)


def test_mask_init_baseline_is_the_expectation_of_bernoulli_draws():
    """The `_init` baselines equal the mean of the measures over many Bernoulli(1-p) draws."""
    g = torch.Generator().manual_seed(0)
    rates = {"a": 0.25, "b": 0.5}
    true = {n: torch.bernoulli(torch.full((1, 400), 1 - p), generator=g) for n, p in rates.items()}
    expected = M.mask_measures(true, true, {"a": "x", "b": "y"}, rates)
    draws = [
        M.mask_measures(
            {n: torch.bernoulli(torch.full((1, 400), 1 - p), generator=g) for n, p in rates.items()},
            true,
            {"a": "x", "b": "y"},
            rates,
        )
        for _ in range(300)
    ]
    for m in ("recall", "precision", "bal_acc", "accuracy"):
        mean = torch.stack([d[f"mask_{m}"] for d in draws]).mean()
        torch.testing.assert_close(mean, expected[f"mask_{m}_init"][0], atol=0.01, rtol=0)
    assert expected["mask_bal_acc"].eq(1).all()  # the true masks themselves score perfectly


def test_lpips_offline_is_null_with_one_clear_warning(monkeypatch, tmp_path):
    import lpips

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    monkeypatch.setattr(M, "_lpips_cache", {})
    monkeypatch.setenv("DIA_CACHE_DIR", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert M.load_lpips("alex") is None
        assert M.load_lpips("alex") is None  # cached: no second warning
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "LPIPS disabled" in msgs[0] and "null" in msgs[0]


def test_lpips_is_tried_once_per_machine_and_on_request_again(monkeypatch, tmp_path, capfd):
    """Every run printed torch.hub's download line in the middle of the bar and the LPIPS warning: the failure is
    remembered (a marker file) and said once; later processes skip the attempt quietly until asked to retry."""
    import lpips

    tries: list[int] = []

    def offline(*args, **kwargs):
        tries.append(1)
        print('Downloading: "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"')  # as torch.hub does
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    monkeypatch.setenv("DIA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DIA_RETRY_LPIPS", raising=False)
    monkeypatch.setattr(M, "_lpips_cache", {})
    with pytest.warns(RuntimeWarning, match="Not tried again on this machine .*DIA_RETRY_LPIPS=1"):
        assert M.load_lpips("alex") is None
    assert M.lpips_marker("alex") == tmp_path / "lpips-alex-unavailable" and M.lpips_marker("alex").is_file()
    assert "Downloading" not in capfd.readouterr().out
    monkeypatch.setattr(M, "_lpips_cache", {})  # the next process on this machine: no attempt, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.load_lpips("alex") is None
    assert len(tries) == 1
    monkeypatch.setattr(M, "_lpips_cache", {})
    monkeypatch.setenv("DIA_RETRY_LPIPS", "1")
    with pytest.warns(RuntimeWarning):
        M.load_lpips("alex")
    assert len(tries) == 2
    monkeypatch.delenv("DIA_RETRY_LPIPS")
    monkeypatch.setattr(lpips, "LPIPS", lambda *a, **k: lpips.pn.alexnet(requires_grad=False, pretrained=False))
    monkeypatch.setattr(M, "_lpips_cache", {})
    M.lpips_marker("alex").unlink()  # deleting the marker retries too; a success forgets the failure
    assert M.load_lpips("alex") is not None and not M.lpips_marker("alex").exists()


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
