"""Layer names, shapes, and running a model in pieces (front to layers, layer to logits)."""

import pytest
import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.layers import LayerTap, check_layers, layer_names, layer_shapes


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU6()

    def forward(self, x):
        return x + self.act(self.bn(self.conv(x)))


class TinyNet(nn.Module):
    """A residual ReLU6/BatchNorm net like the real ones, small enough for exact references."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8), Block(8))
        self.unused = nn.Linear(2, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture()
def net():
    torch.manual_seed(0)
    model = TinyNet().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial running statistics
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model


def test_layer_names_and_shapes(net):
    names = layer_names(net)
    assert names[:3] == ["stem", "blocks", "blocks.0"]
    shapes = layer_shapes(net, (3, 16, 16))
    assert shapes["stem"] == (8, 8, 8)
    assert shapes["fc"] == (5,)
    assert "unused" not in shapes  # never called by forward


def test_unknown_layer_names_closest_and_points_to_atlas_layers(net):
    with pytest.raises(AtlasError, match=r"closest: blocks\.1.*atlas layers tiny") as info:
        check_layers(net, ["block.1"], "tiny")
    assert "\n" not in str(info.value)
    with pytest.raises(AtlasError, match="never called"):
        LayerTap(net, ["unused"])


def test_front_stops_at_deepest_layer_and_rest_gives_the_logits(net):
    tap = LayerTap(net, ["blocks.1", "blocks.0.conv"])
    x = torch.randn(2, 3, 16, 16)
    called = []
    handle = net.fc.register_forward_hook(lambda *a: called.append(1))
    try:
        out = tap.run(x, logits=False)
        assert out.logits is None and not called  # nothing after the deepest layer ran
    finally:
        handle.remove()
    out = tap.run(x, logits=True)
    reference = {}
    hooks = [dict(net.named_modules())[n].register_forward_hook(
        lambda m, i, o, n=n: reference.__setitem__(n, o)) for n in tap.layers]
    try:
        logits = net(x)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-6)
    for name in tap.layers:
        torch.testing.assert_close(out.acts[name], reference[name], rtol=0, atol=0)


@pytest.mark.parametrize("layer, channels_last", [("blocks.1", False), ("blocks.0.conv", False),
                                                  ("stem", False), ("blocks.1", True)])
def test_attribution_equals_reverse_mode_reference(net, layer, channels_last):
    x = torch.randn(3, 3, 16, 16)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    tap = LayerTap(net, [layer])
    out = tap.run(x, logits=True)
    yx = torch.tensor([[[2, 3], [4, 4]], [[1, 1], [6, 5]], [[7, 7], [0, 0]]])
    attr = tap.attribute(layer, out, yx, chunk=2)  # chunk smaller than the batch: several passes

    # Reference: one reverse-mode gradient per class, then h_p . grad_p.
    h = out.acts[layer].detach().requires_grad_(True)
    replaced = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: h)
    try:
        logits = net(x)
    finally:
        replaced.remove()
    expected = torch.zeros(3, 2, 5)
    for c in range(5):
        (grad,) = torch.autograd.grad(logits[:, c].sum(), h, retain_graph=True)
        for b in range(3):
            for j in range(2):
                y, x_ = yx[b, j]
                expected[b, j, c] = (grad[b, :, y, x_] * h[b, :, y, x_]).sum()
    assert expected.abs().max() > 1e-4  # the reference is not trivially zero
    torch.testing.assert_close(attr, expected, rtol=1e-4, atol=1e-6)


def test_attribution_over_all_positions_sums_like_the_full_tangent(net):
    """Masks over every position add up to the jvp with the whole h as tangent."""
    tap = LayerTap(net, ["blocks.2"])
    x = torch.randn(2, 3, 16, 16)
    out = tap.run(x, logits=True)
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    yx = torch.stack([ys.flatten(), xs.flatten()], -1).expand(2, -1, -1)
    attr = tap.attribute("blocks.2", out, yx)
    h = out.acts["blocks.2"]
    _, full = torch.func.jvp(lambda h_: tap.rest["blocks.2"](h_, *out.saved), (h,), (h,))
    torch.testing.assert_close(attr.sum(1), full, rtol=1e-4, atol=1e-5)


def test_in_place_activation_after_a_layer_does_not_overwrite_it():
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()  # ReLU(inplace=True) after bn1
    tap = LayerTap(model, ["layer1.0.bn1"])
    with torch.no_grad():
        acts = tap.run(torch.randn(1, 3, 64, 64), logits=True).acts["layer1.0.bn1"]
    assert acts.min() < 0  # still the BatchNorm output, not its ReLU


def test_attribution_with_several_layers_takes_the_tangent_rules_through_the_deeper_ones(net):
    """The rest graph of blocks.0 holds blocks.2 as one call; it is traced through, not left to vmap."""
    x = torch.randn(2, 3, 16, 16)
    yx = torch.tensor([[[2, 3], [4, 4]], [[1, 1], [6, 5]]])
    both = LayerTap(net, ["blocks.0", "blocks.2"])
    out = both.run(x, logits=True)
    attr = both.attribute("blocks.0", out, yx)
    assert both._tangent_graphs["blocks.0"].supported
    alone = LayerTap(net, ["blocks.0"])
    torch.testing.assert_close(attr, alone.attribute("blocks.0", alone.run(x, logits=True), yx), rtol=1e-5, atol=1e-6)
