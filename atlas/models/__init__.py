"""Models for atlas: loading by name, preprocessing, class names, and EfficientNet-Lite0.

`load_model` takes `efficientnet_lite0` (offline default), any torchvision classifier name, or
`package.module:factory`, and returns a `LoadedModel` (eval mode, frozen parameters) with its
`Preprocess` and `ClassNames`.
"""

from .classes import ClassNames, imagenet_classes
from .efficientnet_lite import EfficientNetLite, TFSamePad2d, efficientnet_lite0
from .zoo import LoadedModel, Preprocess, fixed_input_size, list_models, load_model

__all__ = [
    "ClassNames",
    "EfficientNetLite",
    "LoadedModel",
    "Preprocess",
    "TFSamePad2d",
    "efficientnet_lite0",
    "fixed_input_size",
    "imagenet_classes",
    "list_models",
    "load_model",
]
