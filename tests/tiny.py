"""Tiny hand-set models and generated images for fast tests (importable as `tiny:make`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

SIZE = 8  # input side of the tiny model, pixels


class TinyNet(nn.Module):
    """`features` copies the input (identity 1x1 conv), so its activations are the pixels."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1, bias=False)
        self.act = nn.ReLU()
        self.deep = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3).view(3, 3, 1, 1))

    def forward(self, x):
        x = self.act(self.features(x))
        x = self.act(self.deep(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def make() -> nn.Module:
    """The factory the configs name as `tiny:make` (seeded: same weights every time)."""
    generator = torch.Generator().manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("features"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def pattern(index: int) -> np.ndarray:
    """The (SIZE, SIZE, 3) uint8 image number `index`: R = 16 x, G = 16 y, B = index."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([xs * 16, ys * 16, np.full_like(xs, index % 256)], axis=-1).astype(np.uint8)


def write_images(root: Path, n: int, classes: tuple[str, ...] = ("n01440764", "n01443537")) -> list[Path]:
    """Writes n lossless pattern PNGs into ImageFolder subfolders named by wnid."""
    paths = []
    for i in range(n):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:03d}.png"
        Image.fromarray(pattern(i)).save(path)
        paths.append(path)
    return paths


def config_text(run_dir: Path, images: Path, **collect) -> str:
    """A config for the tiny model over generated images."""
    table = {"samples_per_image": 3, "border": 1, "batch_size": 4, "workers": 0, "dtype": "float32"}
    table.update(collect)
    lines = [f'run_dir = "{run_dir}"', f'images = "{images}"', 'model = "tiny:make"',
             'layers = ["features", "deep"]', 'weights = "none"',
             "[preprocess]", f"size = {SIZE}", f"resize = {SIZE}", "mean = [0.0, 0.0, 0.0]",
             "std = [1.0, 1.0, 1.0]", "[collect]"]
    for key, value in table.items():
        lines.append(f"{key} = " + (f'"{value}"' if isinstance(value, str) else str(value).lower()))
    return "\n".join(lines) + "\n"


VIT_SIZE = 32  # input side of the tiny transformers (the ViT takes only this size)


def _seeded(model: nn.Module) -> nn.Module:
    """Every parameter redrawn from one seeded generator (torchvision zero-initialises ViT heads,
    which would make every logit and attribution zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln.weight", "ln_1.weight", "ln_2.weight", "norm.weight", "norm1.weight",
                              "norm2.weight")):
                continue  # LayerNorm gains stay 1
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


def vit() -> nn.Module:
    """`tiny:vit`: a 3-block ViT on 32 px inputs, 4 px patches (an 8x8 grid plus a class token)."""
    from torchvision.models.vision_transformer import VisionTransformer

    return _seeded(VisionTransformer(image_size=VIT_SIZE, patch_size=4, num_layers=3, num_heads=2, hidden_dim=16,
                                     mlp_dim=32, num_classes=1000))


def swin() -> nn.Module:
    """`tiny:swin`: a 2-stage Swin on 32 px inputs (16x16 then 8x8 channels-last maps)."""
    from torchvision.models.swin_transformer import SwinTransformer

    return _seeded(SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                                   window_size=[4, 4], num_classes=1000))


class ColourNet(nn.Module):
    """Classifies an image by its mean colour, with hand-set weights (exact expected verdicts).

    `features` copies the pixels (identity 1x1 conv); the logits of its 5 classes are
    10 x (mean red, mean blue, mean green), 2 and 0: red images are class 0, blue ones class 1,
    green ones class 2, and dark ones (every mean below 0.2) class 3.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 5)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[10.0, 0, 0], [0, 0, 10.0], [0, 10.0, 0], [0, 0, 0], [0, 0, 0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 0, 0, 2.0, 0]))

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def colour() -> nn.Module:
    """The factory `tiny:colour`."""
    return ColourNet().eval()
