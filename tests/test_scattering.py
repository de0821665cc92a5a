"""The scattering transform that dp-mepf's second label filter reads (privsynth.scattering)."""
from __future__ import annotations

import pytest
import torch

from privsynth.scattering import Scattering, ScatterView, channels


def _pattern() -> torch.Tensor:
    i = torch.arange(28.0)
    img = (torch.sin(i[:, None] / 3.0) * torch.cos(i[None, :] / 5.0 + 0.5) + 1) / 2
    return (img * (i[:, None] > 6))[None, None]  # a smooth pattern with an edge, in [0, 1]


def test_coefficients_match_kymatio() -> None:
    # kymatio 0.3.0, Scattering2D(J=2, shape=(28, 28), L=8) on the same image: spatial sums of
    # maps 0 (order 0), 1, 4, 8, 13 (order 1) and 17, 30, 49, 66, 80 (order 2)
    reference = [17.05956, 0.49395, 0.91671, 0.33928, 1.67357, 0.03703, 0.03596, 0.05321,
                 0.02041, 0.02644]
    out = Scattering((28, 28))(_pattern())
    assert out.shape == (1, 81, 7, 7) and channels(2, 8) == 81
    sums = out[0].sum((1, 2))[[0, 1, 4, 8, 13, 17, 30, 49, 66, 80]]
    torch.testing.assert_close(sums, torch.tensor(reference), rtol=2e-5, atol=2e-5)
    assert out[0, 17, 3, 3].item() == pytest.approx(0.00081894, rel=1e-3)


def test_a_constant_image_has_only_its_mean() -> None:
    out = Scattering((16, 16))(torch.full((2, 1, 16, 16), 0.6))
    torch.testing.assert_close(out[:, 0], torch.full((2, 4, 4), 0.6), rtol=1e-3, atol=1e-3)
    assert out[:, 1:].abs().max() < 1e-4  # wavelets have zero mean


def test_channels_are_transformed_separately() -> None:
    x = torch.rand(3, 2, 28, 28)
    both = Scattering((28, 28))(x)
    assert both.shape == (3, 162, 7, 7)
    torch.testing.assert_close(both[:, 81:], Scattering((28, 28))(x[:, 1:]))


def test_the_view_groups_normalise_each_image() -> None:
    view = ScatterView((28, 28), 1)
    rows = view(torch.rand(4, 1, 28, 28))
    assert rows.shape == (4, view.dim) and view.dim == 81 * 49
    groups = rows.view(4, 27, -1)
    assert groups.mean(2).abs().max() < 1e-4
    var = groups.var(2, unbiased=False)  # v / (v + 1e-5): the small second-order groups stay small
    assert var.max() <= 1.0 + 1e-4 and (var[:, 0] > 0.99).all()
    assert (rows.norm(dim=1) <= view.dim ** 0.5 + 1e-3).all()


@pytest.mark.parametrize("shape, j", [((30, 28), 2), ((8, 8), 3), ((28, 28), 0)])
def test_shapes_it_cannot_transform_are_refused(shape, j) -> None:
    with pytest.raises(ValueError):
        Scattering(shape, j)
