"""The 2-D wavelet scattering transform (Mallat; the Morlet filter bank and algorithm of kymatio's
`Scattering2D`, written here in torch so that no further package is needed).

A fixed, data-independent view of the pixels: Morlet wavelets at `J` scales and `L` orientations,
modulus, a second wavelet layer on each first-layer modulus at a coarser scale, and a Gaussian
low-pass subsampled by 2^J. On a 28 x 28 grey image with J = 2, L = 8 it gives 1 + J L + L^2 J (J-1)/2
= 81 maps of 7 x 7. Tramer & Boneh (ICLR 2021, "Differentially private learning needs better
features") showed that a linear model on these maps, group-normalised per image, is a strong
DP-SGD classifier of small images; dp-mepf's second label filter uses it (privsynth.generators.judge).

The filters are built in the Fourier domain on the reflect-padded grid, as kymatio 0.3 does (its
BSD-3 licensed filter_bank.py and core/scattering2d.py are the reference; outputs agree to float
rounding).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _gabor(m: int, n: int, sigma: float, theta: float, xi: float, slant: float = 1.0) -> np.ndarray:
    """A Gabor filter g_sigma(u) e^(i xi.u) on an m x n grid, periodised over 5 x 5 copies."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    curv = rot @ np.diag([1.0, slant * slant]) @ rot.T / (2 * sigma * sigma)
    out = np.zeros((m, n), np.complex128)
    for ex in range(-2, 3):
        for ey in range(-2, 3):
            xx, yy = np.mgrid[ex * m:(ex + 1) * m, ey * n:(ey + 1) * n]
            arg = (-(curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy)
                   + 1j * xi * (xx * math.cos(theta) + yy * math.sin(theta)))
            out += np.exp(arg)
    return out / (2 * 3.1415 * sigma * sigma / slant)  # kymatio's normalisation constant


def _morlet(m: int, n: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Gabor filter minus its envelope times the constant that makes the sum zero."""
    wave, envelope = _gabor(m, n, sigma, theta, xi, slant), _gabor(m, n, sigma, theta, 0.0, slant)
    return wave - wave.sum() / envelope.sum() * envelope


def _periodise(spectrum: np.ndarray, res: int) -> np.ndarray:
    """The filter's spectrum for a signal subsampled by 2^res: high frequencies cut, the rest
    folded onto the (m / 2^res) x (n / 2^res) grid."""
    m, n = spectrum.shape
    k = 2 ** res
    mask = np.ones_like(spectrum)
    mask[int(m * 2 ** (-res - 1)):int(m * 2 ** (-res - 1)) + int(m * (1 - 2 ** -res)), :] = 0
    mask[:, int(n * 2 ** (-res - 1)):int(n * 2 ** (-res - 1)) + int(n * (1 - 2 ** -res))] = 0
    return (spectrum * mask).reshape(k, m // k, k, n // k).sum((0, 2))


def channels(j: int, l: int) -> int:
    """Maps per input channel: 1 + J L + L^2 J (J - 1) / 2."""
    return 1 + j * l + l * l * j * (j - 1) // 2


class Scattering(nn.Module):
    """Scattering coefficients of (N, C, H, W) images: (N, C * channels(J, L), H / 2^J, W / 2^J).

    H and W must be multiples of 2^J. Channel order is kymatio's: order 0, then order 1 by
    (scale, angle), then order 2 by (first path, second path)."""

    def __init__(self, shape: tuple[int, int], j: int = 2, l: int = 8) -> None:
        super().__init__()
        h, w = shape
        if j < 1 or l < 1 or h % 2 ** j or w % 2 ** j:
            raise ValueError(f"scattering needs J >= 1, L >= 1 and sides divisible by 2^J; got "
                             f"J={j}, L={l}, {h}x{w}")
        self.j, self.l, self.shape = j, l, (h, w)
        mp, np_ = ((h + 2 ** j) // 2 ** j + 1) * 2 ** j, ((w + 2 ** j) // 2 ** j + 1) * 2 ** j
        self.pad = ((np_ - w) // 2, (np_ - w + 1) // 2, (mp - h) // 2, (mp - h + 1) // 2)
        if max(self.pad) >= min(h, w):
            raise ValueError(f"{h}x{w} is too small for reflect padding at J={j}")
        psi = {}  # (scale, res) -> (L, m, n) spectra at resolution res
        for scale in range(j):
            spectra = [np.real(np.fft.fft2(_morlet(mp, np_, 0.8 * 2 ** scale,
                                                   (int(l - l / 2 - 1) - t) * math.pi / l,
                                                   3.0 / 4.0 * math.pi / 2 ** scale, 4.0 / l)))
                       for t in range(l)]
            for res in range(min(scale + 1, max(j - 1, 1))):
                psi[scale, res] = np.stack([_periodise(s, res) for s in spectra])
        phi = np.real(np.fft.fft2(_gabor(mp, np_, 0.8 * 2 ** (j - 1), 0.0, 0.0)))
        for (scale, res), value in psi.items():  # used subsampled by 2^(scale - res): the mean
            # of that many folds, its 1 / k^2 taken here
            self.register_buffer(f"psi_{scale}_{res}", torch.tensor(
                value / 4 ** (scale - res), dtype=torch.complex64))
        for res in range(j):  # low-pass, subsample to 1 / 2^J and crop: one linear map per res
            self.register_buffer(f"low_{res}", _low_pass_matrix(_periodise(phi, res), 2 ** (j - res)))

    def _psi(self, scale: int, res: int) -> torch.Tensor:
        return getattr(self, f"psi_{scale}_{res}")

    @staticmethod
    def _filter(spectrum: torch.Tensor, filters: torch.Tensor, k: int) -> torch.Tensor:
        """Each spectrum (..., m, n) times each filter (F, m, n), subsampled by k in the Fourier
        domain (the sum of the k x k folds; the filters carry the 1 / k^2): (..., F, m / k, n / k)."""
        if k == 1:
            return spectrum.unsqueeze(-3) * filters
        m, n = spectrum.shape[-2:]
        folds = spectrum.unflatten(-1, (k, n // k)).unflatten(-3, (k, m // k))
        return torch.einsum("...paqc,fpaqc->...fac", folds,
                            filters.unflatten(-1, (k, n // k)).unflatten(-3, (k, m // k)))

    def _low(self, maps: torch.Tensor, res: int) -> torch.Tensor:
        """Real maps (..., m, n) at resolution `res` -> low-passed (..., h / 2^J, w / 2^J)."""
        h, w = (side // 2 ** self.j for side in self.shape)
        return (maps.flatten(-2) @ getattr(self, f"low_{res}")).unflatten(-1, (h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        n, c, h, w = x.shape
        if (h, w) != self.shape:
            raise ValueError(f"this scattering is built for {self.shape}, got {h}x{w}")
        x = F.pad(x.reshape(n * c, 1, h, w).float(), self.pad, mode="reflect")[:, 0]
        u0 = torch.fft.fft2(x)  # (B, m, n)
        parts, u1, second = [self._low(x, 0)[:, None]], {}, {}
        for scale in range(self.j):
            u = torch.fft.ifft2(self._filter(u0, self._psi(scale, 0), 2 ** scale)).abs()
            parts.append(self._low(u, scale))  # (B, L, h', w')
            if scale < self.j - 1:
                u1[scale] = torch.fft.fft2(u)
        for s1 in range(self.j):
            for s2 in range(s1 + 1, self.j):
                u = torch.fft.ifft2(self._filter(u1[s1], self._psi(s2, s1), 2 ** (s2 - s1))).abs()
                second[s1, s2] = self._low(u, s2)  # (B, L1, L2, h', w')
        for s1 in range(self.j - 1):  # kymatio's order: each first path, then its second paths
            paths = torch.cat([second[s1, s2] for s2 in range(s1 + 1, self.j)], 2)
            parts.append(paths.flatten(1, 2))
        out = torch.cat(parts, 1)
        return out.reshape(n, c * out.shape[1], *out.shape[-2:])


def _low_pass_matrix(phi: np.ndarray, k: int) -> torch.Tensor:
    """The (m n, h' w') matrix of: multiply the spectrum by `phi`, subsample by k in Fourier,
    back to space, take the real part, drop the one-sample border of the padding."""
    m, n = phi.shape
    basis = np.eye(m * n).reshape(m * n, m, n)
    spec = np.fft.fft2(basis) * phi
    spec = spec.reshape(m * n, k, m // k, k, n // k).mean((1, 3))
    out = np.real(np.fft.ifft2(spec))[:, 1:-1, 1:-1]
    return torch.tensor(out.reshape(m * n, -1), dtype=torch.float32)


class ScatterView(nn.Module):
    """The judge's view of uint8-scaled images in [0, 1]: scattering maps, group-normalised per
    image (`groups` groups of consecutive maps, as in Tramer & Boneh), flattened."""

    def __init__(self, shape: tuple[int, int], channels_in: int, j: int = 2, l: int = 8,
                 groups: int = 27) -> None:
        super().__init__()
        self.scattering = Scattering(shape, j, l)
        maps = channels_in * channels(j, l)
        if maps % groups:
            raise ValueError(f"{maps} scattering maps cannot form {groups} equal groups")
        self.groups = groups
        self.dim = maps * (shape[0] // 2 ** j) * (shape[1] // 2 ** j)
        self.name = f"scattering-J{j}-L{l}-groups{groups}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.group_norm(self.scattering(x), self.groups).flatten(1)
