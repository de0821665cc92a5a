"""A small class-conditional convolutional generator (latent + class embedding -> image in [0, 1])."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ConvGenConfig:
    """Shape of the generator; stored next to its weights so `sample` needs only the run folder."""

    num_classes: int
    channels: int
    resolution: int
    latent_dim: int = 64  # size of the Gaussian latent
    width: int = 64  # channels of the last upsampling stage; earlier stages double it
    blocks: int = 0  # residual 3x3 convolution blocks at the seed resolution and after each
    # upsampling below the output's (a quarter or less of the last stage's pixels each)

    def to_dict(self) -> dict:
        """JSON form."""
        return asdict(self)


def _upsamplings(resolution: int) -> int:
    """How many x2 stages take a 4..8 pixel seed to `resolution` (which must divide evenly)."""
    ups = 0
    while resolution % 2 == 0 and resolution // 2 >= 4 and (resolution > 8 or ups == 0):
        resolution //= 2
        ups += 1
    return ups


class TapConv2d(nn.Conv2d):
    """A 3x3 'same' convolution to a few output channels (the image layer), computed as one 1x1
    convolution to the 9 tap maps, shifted and summed. Same parameters and function as
    `nn.Conv2d(c, o, 3, padding=1)`; oneDNN's kernel for 1 output channel is the slow case on CPU
    (at 160 x 64 x 28 x 28: 45-75 ms forward + backward, 21 ms this way)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o, c, kh, kw = self.weight.shape
        taps = F.conv2d(x, self.weight.permute(2, 3, 0, 1).reshape(kh * kw * o, c, 1, 1))
        taps = F.pad(taps, (1, 1, 1, 1))
        h, w = x.shape[-2:]
        out = sum(taps[:, (i * kw + j) * o:(i * kw + j + 1) * o, i:i + h, j:j + w]
                  for i in range(kh) for j in range(kw))
        return out + self.bias.view(1, o, 1, 1)


# Output phase of a stride-2 transposed convolution -> the 3x3 taps it sums: nearest-neighbour
# upsampling repeats each input row twice, so an output row 2i + a of the 3x3 convolution reads
# input rows (i - 1, i) for a = 0 and (i, i + 1) for a = 1 with the taps summed accordingly.
_PHASE_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


class UpConv2d(nn.Conv2d):
    """x2 nearest-neighbour upsampling followed by a 3x3 'same' convolution, computed as one
    stride-2 transposed convolution whose 4x4 kernel sums the 3x3 taps per output phase. Same
    parameters and function as `nn.Upsample(scale_factor=2)` then `nn.Conv2d(c, o, 3,
    padding=1)`, at 16 instead of 36 multiply-adds per input pixel and channel pair (on 2 CPU
    cores, 160 x 64 x 14 x 14 -> 28 x 28 forward + backward: 366 -> 164 ms)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = _PHASE_TAPS.to(self.weight)
        kernel = torch.einsum("ki,lj,ocij->cokl", taps, taps, self.weight)
        return F.conv_transpose2d(x, kernel, self.bias, stride=2, padding=1)


class Residual(nn.Module):
    """x + SiLU(GroupNorm(conv 3x3 (x))): a block that adds depth without a new shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(8, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + F.silu(self.norm(self.conv(x)))


class ConvGenerator(nn.Module):
    """fc -> GroupNorm, SiLU, [blocks] -> (x2 up + conv, GroupNorm, SiLU, [blocks below the
    output size]) x k -> conv -> sigmoid."""

    def __init__(self, cfg: ConvGenConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ups = _upsamplings(cfg.resolution)
        self.base = cfg.resolution >> ups
        if self.base << ups != cfg.resolution:
            raise ValueError(f"resolution {cfg.resolution} must be 4..8 times a power of two")
        top = cfg.width * 2 ** max(ups - 1, 0)
        self.embed = nn.Embedding(cfg.num_classes, cfg.latent_dim)
        self.fc = nn.Linear(2 * cfg.latent_dim, top * self.base * self.base)
        if cfg.blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {cfg.blocks}")
        layers: list[nn.Module] = [nn.GroupNorm(8, top), nn.SiLU()]
        layers += [Residual(top) for _ in range(cfg.blocks)]
        ch = top
        for stage in range(ups):
            out = max(cfg.width, ch // 2) if ch > cfg.width else cfg.width
            # (the Identity keeps the layer indices, so weights saved before UpConv2d still load)
            layers += [nn.Identity(), UpConv2d(ch, out), nn.GroupNorm(8, out), nn.SiLU()]
            if stage < ups - 1:
                layers += [Residual(out) for _ in range(cfg.blocks)]
            ch = out
        layers += [TapConv2d(ch, cfg.channels), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)
        self.top = top

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], shape (N, channels, resolution, resolution)."""
        h = self.fc(torch.cat([z, self.embed(labels)], dim=1))
        return self.body(h.view(-1, self.top, self.base, self.base))
