"""Receptive fields measured on the model, checked against hand arithmetic and brute-force gradients."""

import numpy as np
import pytest
import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.models import efficientnet_lite0
from atlas.receptive import ReceptiveField, box_for, receptive_field


def _brute_box(model: nn.Module, layer: str, size: int, y: int, x: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the nonzero gradient of position (y, x) of the ORIGINAL model
    (random float64 weights, positive input), found by brute force."""
    model = model.double()
    out = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: out.setdefault("h", o))
    inp = (0.5 + torch.rand(1, 3, size, size, dtype=torch.float64)).requires_grad_(True)
    model(inp)
    handle.remove()
    (grad,) = torch.autograd.grad(out["h"][0, :, y, x].sum(), inp)
    support = grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = np.flatnonzero(support.any(1).numpy()), np.flatnonzero(support.any(0).numpy())
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _seeded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p)
    return model


@pytest.mark.parametrize("model, layer, expected", [
    # two 3x3 convs, stride 1, padding 1: size 5, centred
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)), "1",
     ReceptiveField(1, 1, 5, 5, -2, -2)),
    # 3x3 stride 2 then 3x3 stride 1 (padding 1): size 7, stride 2
    (nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)), "2",
     ReceptiveField(2, 2, 7, 7, -3, -3)),
    # no padding: the field starts at the image's corner
    (nn.Sequential(nn.Conv2d(3, 4, 5), nn.Conv2d(4, 4, 3, stride=2)), "1", ReceptiveField(2, 2, 7, 7, 0, 0)),
    # ReLU and max pool (which zero gradients in the original) do not shrink the measured field
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1)), "3",
     ReceptiveField(2, 2, 8, 8, -3, -3)),
    # non-square kernel
    (nn.Sequential(nn.Conv2d(3, 4, (1, 3), padding=(0, 1)), nn.Conv2d(4, 4, 3, stride=2, padding=1)), "1",
     ReceptiveField(2, 2, 3, 5, -1, -2)),
])
def test_hand_computed_fields(model, layer, expected):
    rf = receptive_field(model, layer, 16)
    assert rf == expected


@pytest.mark.parametrize("model, layer", [
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)), "1"),
    (nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1)), "1"),
    (nn.Sequential(nn.Conv2d(3, 4, 5, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=2), nn.Conv2d(4, 4, 3)), "2"),
])
def test_matches_brute_force_gradient(model, layer):
    """Without ReLU or max pool the original model's gradient support is the field itself."""
    _seeded(model)
    size = 20
    rf = receptive_field(model, layer, size)
    with torch.no_grad():
        h = model.double()(torch.zeros(1, 3, size, size, dtype=torch.float64))
    hm, wm = h.shape[-2:]
    for y, x in [(0, 0), (hm // 2, wm // 2), (hm - 1, wm - 1), (0, wm - 1)]:
        assert tuple(box_for(rf, [[y, x]], size)[0]) == _brute_box(model, layer, size, y, x)


def test_box_for_clips_and_unclipped():
    rf = ReceptiveField(2, 2, 7, 7, -3, -3)
    boxes = box_for(rf, np.array([[0, 0], [3, 5], [7, 7]]), 16)
    assert boxes.tolist() == [[0, 0, 4, 4], [7, 3, 14, 10], [11, 11, 16, 16]]
    assert box_for(rf, [[0, 0]], 16, clip=False).tolist() == [[-3, -3, 4, 4]]
    assert box_for(rf, np.zeros((0, 2)), 16).shape == (0, 4)


def test_lite0_tf_same_padding():
    model = efficientnet_lite0()
    stem = receptive_field(model, "stem", 224)
    assert (stem.stride_y, stem.stride_x, stem.size_y, stem.offset_y) == (2, 2, 3, 0)  # TF-same: pad after
    deep = receptive_field(model, "blocks.10", 224)
    assert (deep.stride_y, deep.stride_x) == (16, 16)
    assert deep.size_y == deep.size_x > 200  # a deep layer sees most of the image
    assert deep.offset_y < 0


def test_unknown_layer_is_atlas_error():
    with pytest.raises(AtlasError, match="unknown layer"):
        receptive_field(nn.Sequential(nn.Conv2d(3, 3, 3)), "nope", 8)
