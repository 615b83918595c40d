"""TangentGraph's derivative rules against torch.func.jvp on real architectures."""

import pytest
import torch
import torchvision

from atlas.layers import LayerTap, _position_tangents
from atlas.models import efficientnet_lite0
from atlas.tangents import TangentGraph


def reference(tap: LayerTap, layer: str, out, yx: torch.Tensor) -> torch.Tensor:
    """vmap(jvp) over the same tangents: (B, k, n)."""
    h = out.acts[layer]
    index = {node: i for i, node in enumerate(tap._saved)}
    saved = [out.saved[index[n]] for n in tap._rest_inputs[layer]]
    rest = tap.rest[layer]
    jvp = lambda t: torch.func.jvp(lambda h_: rest(h_, *saved), (h,), (t,))[1]  # noqa: E731
    return torch.func.vmap(jvp)(_position_tangents(h, yx)).permute(1, 0, 2)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        model = efficientnet_lite0()
    elif name == "googlenet":
        model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    else:
        model = torchvision.models.get_model(name, weights=None)
    model.eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, as in a trained net
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("name, layer, size", [
    ("efficientnet_lite0", "blocks.9", 96),
    ("efficientnet_lite0", "blocks.5.depthwise.act", 96),
    ("resnet18", "layer2.1.conv1", 64),
    ("vgg11", "features.5", 64),
    ("googlenet", "inception3b", 96),
    ("mobilenet_v3_small", "features.4", 96),
])
def test_tangent_rules_match_jvp(name, layer, size):
    model = build(name)
    tap = LayerTap(model, [layer])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = tap.run(x, logits=True)
    height, width = out.acts[layer].shape[2:]
    g = torch.Generator().manual_seed(1)
    yx = torch.stack([torch.randint(0, height, (2, 3), generator=g),
                      torch.randint(0, width, (2, 3), generator=g)], -1)
    engine = TangentGraph(tap.rest[layer])
    expected = reference(tap, layer, out, yx)
    got = tap.attribute(layer, out, yx)
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(scale.detach()))
    if name != "mobilenet_v3_small":  # squeeze-excite multiplies two layer-dependent tensors: still covered
        assert engine.supported, engine.unsupported


def test_unsupported_graph_is_reported_and_falls_back():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 5)

        def forward(self, x):
            x = torch.nn.functional.softmax(self.conv(x), dim=1)  # no tangent rule for softmax
            return self.fc(x.mean((2, 3)))

    model = Odd().eval()
    tap = LayerTap(model, ["conv"])
    assert not TangentGraph(tap.rest["conv"]).supported
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = tap.run(x, logits=True)
    yx = torch.tensor([[[1, 1], [2, 3]], [[0, 0], [5, 5]]])
    torch.testing.assert_close(tap.attribute("conv", out, yx), reference(tap, "conv", out, yx))
