"""Tests for atlas.models: TF-same padding, preprocessing, class names and loading by name."""

from __future__ import annotations

import math
import sys
import urllib.error

import pytest
import torch
import torch.fx
from PIL import Image
from torch import nn

from atlas.errors import AtlasError
from atlas.models import (ClassNames, EfficientNetLite, LoadedModel, Preprocess, TFSamePad2d,
                          efficientnet_lite0, imagenet_classes, list_models, load_model)
from atlas.models import efficientnet_lite


def brute_force_same_padding(n: int, k: int, s: int) -> tuple[int, int]:
    """The smallest total padding giving TF's output size ceil(n / s), split with the extra after."""
    total = 0
    while (n + total - k) // s + 1 < math.ceil(n / s):
        total += 1
    return total // 2, total - total // 2


def padding_of(pad: nn.Module, n: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero rows/columns that `pad` adds around an (n, n+1) input of ones."""
    out = pad(torch.ones(1, 1, n, n + 1))[0, 0]
    rows, cols = out.sum(1) > 0, out.sum(0) > 0
    top = int(rows.int().argmax())
    bottom = len(rows) - 1 - int(rows.flip(0).int().argmax())
    left = int(cols.int().argmax())
    right = len(cols) - 1 - int(cols.flip(0).int().argmax())
    return top, len(rows) - 1 - bottom, left, len(cols) - 1 - right


@pytest.mark.parametrize("k,s", [(3, 1), (5, 1), (3, 2), (5, 2), (2, 2), (4, 3)])
def test_tf_same_padding_matches_brute_force(k, s):
    pad = TFSamePad2d(k, s)
    conv = nn.Conv2d(1, 1, k, s)
    for n in range(1, 15):
        top, bottom, left, right = padding_of(pad, n)
        assert (top, bottom) == brute_force_same_padding(n, k, s)
        assert (left, right) == brute_force_same_padding(n + 1, k, s)
        out = conv(pad(torch.zeros(1, 1, n, n + 1)))
        assert out.shape[-2:] == (math.ceil(n / s), math.ceil((n + 1) / s))


def test_tf_same_padding_is_asymmetric_on_stride_2_even_input():
    assert padding_of(TFSamePad2d(3, 2), 224)[:2] == (0, 1)
    assert padding_of(TFSamePad2d(5, 2), 14)[:2] == (1, 2)
    assert padding_of(TFSamePad2d(5, 2), 7)[:2] == (2, 2)


def test_traced_padding_follows_the_input_size():
    traced = torch.fx.symbolic_trace(nn.Sequential(TFSamePad2d(5, 2)))
    for n in (6, 7):
        x = torch.randn(1, 2, n, n)
        assert torch.equal(traced(x), TFSamePad2d(5, 2)(x))


def test_preprocess_constant_image_gives_expected_constant():
    pre = Preprocess(size=8, resize=10, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    x = pre(Image.new("RGB", (30, 20), (255, 0, 127)))
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    expected = torch.tensor([(255 - 127) / 128, (0 - 127) / 128, 0.0]).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


def test_preprocess_converts_grayscale_and_crops_the_centre():
    pre = Preprocess(size=4, resize=4, mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest")
    image = Image.new("L", (12, 4), 0)
    image.paste(255, (4, 0, 8, 4))  # the middle third is white: exactly the centre crop
    x = pre(image)
    assert x.shape == (3, 4, 4)
    assert torch.equal(x, torch.ones(3, 4, 4))


def test_normalise_and_to_pixels_round_trip_with_gradients():
    pre = Preprocess()
    pixels = torch.rand(2, 3, 5, 5, requires_grad=True)
    x = pre.normalise(pixels)
    torch.testing.assert_close(x[0, 1], (pixels[0, 1] - 0.456) / 0.224)
    torch.testing.assert_close(pre.to_pixels(x), pixels)
    x.sum().backward()
    torch.testing.assert_close(pixels.grad[0, :, 0, 0], 1 / torch.tensor(pre.std))


@pytest.mark.parametrize("bad", [
    {"size": 0}, {"size": 2.5}, {"resize": 100}, {"mean": (0.5, 0.5)}, {"std": (1, 0, 1)},
    {"interpolation": "lanczos"}, {"mean": "abc"},
])
def test_preprocess_rejects_bad_values(bad):
    with pytest.raises(AtlasError):
        Preprocess(**bad)


def test_preprocess_turns_lists_into_tuples():
    pre = Preprocess(mean=[0, 0, 1], std=[1, 1, 1])
    assert pre.mean == (0.0, 0.0, 1.0)
    hash(pre)


def test_imagenet_class_lookup():
    classes = imagenet_classes()
    assert len(classes) == 1000 and classes is imagenet_classes()
    assert classes.names[0] == "tench" and classes.wnids[0] == "n01440764"
    assert classes.lookup("n01440764") == 0
    assert classes.lookup("N01440764") == 0
    assert classes.lookup("Tench") == 0
    assert classes.lookup("great_white_shark") == 2
    assert classes.lookup("  GREAT White  shark ") == 2
    assert classes.lookup("no such class") is None
    first, second = [i for i, n in enumerate(classes.names) if n == "crane"]
    assert classes.lookup("crane") == first
    assert classes.lookup(classes.wnids[second]) == second


def test_class_names_without_wnids():
    classes = ClassNames(("cat", "dog"))
    assert len(classes) == 2 and classes.lookup("DOG") == 1 and classes.lookup("n0") is None
    with pytest.raises(ValueError):
        ClassNames(("cat",), wnids=("n1", "n2"))


def test_lite0_state_dict_mapping_covers_every_key():
    raw = torch.load(efficientnet_lite.pretrained_lite0_path(), map_location="cpu", weights_only=True)
    converted = efficientnet_lite.convert_state_dict(raw)
    assert len(converted) == len(raw)
    expected = efficientnet_lite0().state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    with pytest.raises(KeyError):
        efficientnet_lite.convert_state_dict({"_se_reduce.weight": torch.zeros(1)})


def test_lite0_loads_pretrained():
    loaded = load_model("efficientnet_lite0")
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.module, EfficientNetLite)
    assert loaded.input_shape == (3, 224, 224)
    assert loaded.preprocess.mean == (127 / 255,) * 3 and loaded.preprocess.std == (128 / 255,) * 3
    assert loaded.classes is imagenet_classes()
    assert not loaded.module.training
    assert not any(p.requires_grad for p in loaded.module.parameters())
    raw = torch.load(efficientnet_lite.pretrained_lite0_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(loaded.module.blocks[10].depthwise.conv.weight,
                               raw["_blocks.10._depthwise_conv.weight"])
    with torch.no_grad():
        logits = loaded.module(torch.zeros(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_lite0_layer_names_and_structure():
    model = efficientnet_lite0()
    names = {name for name, _ in model.named_modules()}
    assert {"stem", "blocks.0", "blocks.15", "blocks.10.expand", "blocks.10.depthwise", "blocks.10.depthwise.pad",
            "blocks.10.project", "head", "pool", "classifier"} <= names
    assert "blocks.0.expand" not in names  # expansion ratio 1
    assert model.blocks[6].residual and not model.blocks[5].residual
    assert isinstance(model.blocks[10].depthwise.act, nn.ReLU6)
    assert model.stem.bn.eps == 1e-3


def test_lite0_is_traceable_at_any_input_size():
    model = efficientnet_lite0().eval()
    traced = torch.fx.symbolic_trace(model)
    for n in (96, 81):  # 96 pads like 224 (even at every stride 2); 81 is odd at some, where padding differs
        x = torch.randn(1, 3, n, n)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x))


def test_lite0_weights_none_and_local_file(tmp_path):
    torch.manual_seed(0)
    random = load_model("efficientnet_lite0", weights="none").module
    path = tmp_path / "lite0.pth"
    torch.save(random.state_dict(), path)
    loaded = load_model("efficientnet_lite0", weights=str(path)).module
    torch.testing.assert_close(loaded.classifier.weight, random.classifier.weight)


@pytest.mark.parametrize("name", ["googlenet", "resnet18"])
def test_torchvision_by_name_without_weights(name):
    loaded = load_model(name, weights="none")
    assert loaded.classes is imagenet_classes()
    assert loaded.preprocess == Preprocess()  # these weights' transforms are the ImageNet defaults
    with torch.no_grad():
        out = loaded.module(torch.zeros(1, *loaded.input_shape))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1000)


def test_googlenet_is_traceable():
    torch.fx.symbolic_trace(load_model("googlenet", weights="none").module)


def test_torchvision_local_weights(tmp_path):
    source = load_model("resnet18", weights="none").module
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = load_model("resnet18", weights=str(path)).module
    torch.testing.assert_close(loaded.fc.weight, source.fc.weight)
    with pytest.raises(AtlasError, match="don't match the architecture of resnet34"):
        load_model("resnet34", weights=str(path))


def test_googlenet_file_with_aux_heads_loads(tmp_path):
    import torchvision

    with_aux = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "googlenet.pth"
    torch.save(with_aux.state_dict(), path)
    loaded = load_model("googlenet", weights=str(path)).module
    torch.testing.assert_close(loaded.fc.weight, with_aux.fc.weight)


def test_missing_weights_file():
    with pytest.raises(AtlasError, match="not found"):
        load_model("resnet18", weights="/no/such/file.pth")
    with pytest.raises(AtlasError, match="not found"):
        load_model("efficientnet_lite0", weights="no_such.pth")


def test_unreadable_weights_file(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(AtlasError, match="cannot read"):
        load_model("resnet18", weights=str(path))


def test_offline_default_weights_give_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(AtlasError, match="efficientnet_lite0") as info:
        load_model("resnet18")
    assert "none" in str(info.value) and "\n" not in str(info.value)


def test_unknown_model_suggests_close_names():
    with pytest.raises(AtlasError, match="resnet50") as info:
        load_model("resnet5O")
    assert "package.module:factory" in str(info.value)


def test_preprocess_overrides():
    loaded = load_model("resnet18", weights="none", preprocess={"size": 160, "resize": 182})
    assert loaded.input_shape == (3, 160, 160) and loaded.preprocess.mean == Preprocess().mean
    with pytest.raises(AtlasError, match="unknown preprocess setting 'crop'"):
        load_model("resnet18", weights="none", preprocess={"crop": 200})
    with pytest.raises(AtlasError, match="interpolation"):
        load_model("resnet18", weights="none", preprocess={"interpolation": "cubic"})


def test_list_models():
    names = list_models()
    assert names[0] == "efficientnet_lite0"
    assert {"googlenet", "resnet50", "vgg16", "mobilenet_v3_small"} <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names


FACTORY_SOURCE = '''
from torch import nn

def tiny(n_out=10):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, n_out))

def tiny_imagenet():
    return tiny(1000)

def not_a_module():
    return 3
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "atlas_test_factories.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "atlas_test_factories", raising=False)
    yield "atlas_test_factories"
    sys.modules.pop("atlas_test_factories", None)


def test_factory_model(factories, tmp_path):
    loaded = load_model(f"{factories}:tiny", weights="none", preprocess={"size": 16, "resize": 20})
    assert loaded.classes is None and loaded.input_shape == (3, 16, 16)
    assert loaded.preprocess.mean == Preprocess().mean
    assert not loaded.module.training and not any(p.requires_grad for p in loaded.module.parameters())
    assert load_model(f"{factories}:tiny_imagenet").classes is imagenet_classes()

    path = tmp_path / "tiny.pth"
    torch.save(loaded.module.state_dict(), path)
    again = load_model(f"{factories}:tiny", weights=str(path))
    torch.testing.assert_close(again.module[3].weight, loaded.module[3].weight)


def test_factory_errors(factories):
    with pytest.raises(AtlasError, match="not a torch.nn.Module"):
        load_model(f"{factories}:not_a_module")
    with pytest.raises(AtlasError, match="has no 'missing'"):
        load_model(f"{factories}:missing")
    with pytest.raises(AtlasError, match="cannot import"):
        load_model("no_such_package_xyz.models:make")
    with pytest.raises(AtlasError, match="fails on a"):
        load_model(f"{factories}:tiny", preprocess={"size": 1, "resize": 1})


def test_random_weights_are_the_same_network_in_every_load_and_leave_the_rng_alone():
    """weights = "none": collect and render load the model in separate processes, so the random
    initialisation must not depend on the global random state (nor change it)."""
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = load_model("resnet18", "none").module.state_dict()
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is untouched
    torch.manual_seed(999)
    second = load_model("resnet18", "none").module.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
