"""A small ResNet-style encoder-decoder with three pixel-wise tasks, and synthetic scenes for it.

The kind of network the paper balances on NYUv2 (section 5: depth, surface normals, segmentation from
one SegNet-like trunk), scaled down to run anywhere: it serves the dense-prediction step-time benchmark
(``benchmarks/bench_dense.py``) and the tests of the convolutional paths. W, GradNorm's shared layer, is
the trunk's last convolution (paper 3.1: "the last shared layer"); each head reads its ReLU output.

The scenes are generated, not downloaded: a smooth random depth field, its surface normals, and a
segmentation by depth bands, with the image a noisy shading of the three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

TASKS = ("segmentation", "depth", "normals")


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.skip(x))


class DenseMultiTaskNet(nn.Module):
    """Encoder (3 residual stages, /4), decoder (x4 upsampling), shared conv W, three pixel-wise heads."""

    def __init__(self, classes: int = 5, width: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            _conv_bn_relu(3, width),
            ResidualBlock(width, 2 * width, stride=2),
            ResidualBlock(2 * width, 4 * width, stride=2),
            ResidualBlock(4 * width, 4 * width),
        )
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _conv_bn_relu(4 * width, 2 * width),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _conv_bn_relu(2 * width, width),
        )
        self.shared = nn.Conv2d(width, width, 3, 1, 1)

        def head(out_channels: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(width, out_channels, 1))

        self.heads = nn.ModuleList([head(classes), head(1), head(3)])

    def forward(self, images: Tensor) -> list[Tensor]:
        features = F.relu(self.shared(self.decoder(self.encoder(images))))
        return [h(features) for h in self.heads]


@dataclass
class Scenes:
    images: Tensor  # (N, 3, S, S)
    segmentation: Tensor  # (N, S, S) class indices
    depth: Tensor  # (N, 1, S, S)
    normals: Tensor  # (N, 3, S, S), unit length


def make_scenes(count: int, size: int = 64, classes: int = 5, seed: int = 0, noise: float = 0.05) -> Scenes:
    """``count`` scenes of ``size`` x ``size`` pixels. The image's channels are a shading of the normals, the depth
    and the segmentation, each with Gaussian noise of standard deviation ``noise``: at 0.05 (the benchmarks')
    the labels are nearly read off the image; larger values leave them to be recovered by smoothing."""
    if count < 1 or size < 2 or classes < 2 or noise < 0:
        raise ValueError(f"make_scenes: need count >= 1, size >= 2, classes >= 2 and noise >= 0, got {count}, {size}, {classes}, {noise}")
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, max(size // 16, 2), max(size // 16, 2), generator=generator)
    depth = 1.0 + 3.0 * F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    dz_dy, dz_dx = torch.gradient(depth[:, 0] * size / 4, dim=(1, 2))
    normals = F.normalize(torch.stack([-dz_dx, -dz_dy, torch.ones_like(dz_dx)], dim=1), dim=1)
    edges = torch.linspace(1.0, 4.0, classes + 1)[1:-1]
    segmentation = torch.bucketize(depth[:, 0], edges)
    light = F.normalize(torch.tensor([0.3, 0.5, 1.0]), dim=0).view(1, 3, 1, 1)
    shading = (normals * light).sum(1, keepdim=True)
    images = torch.cat([shading, depth / 4, segmentation[:, None].float() / classes], 1) + noise * torch.randn(count, 3, size, size, generator=generator)
    return Scenes(images, segmentation, depth, normals)


def task_losses(outputs: list[Tensor], scenes: Scenes) -> list[Tensor]:
    """Cross-entropy, L1 depth, and 1 - cosine similarity of the normals, one scalar per task."""
    seg, depth, normals = outputs
    return [
        F.cross_entropy(seg.float(), scenes.segmentation),
        F.l1_loss(depth.float(), scenes.depth),
        (1 - F.cosine_similarity(normals.float(), scenes.normals, dim=1)).mean(),
    ]


def batch(scenes: Scenes, index: Tensor, device: torch.device) -> Scenes:
    return Scenes(*(getattr(scenes, name)[index].to(device, non_blocking=True) for name in ("images", "segmentation", "depth", "normals")))
