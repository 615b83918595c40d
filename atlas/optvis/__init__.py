"""Feature visualisation from small composable pieces (after Lucid and Lucent).

- parameterisations (`fourier_image`, `pixel_image`) return `(params, image_fn)`;
- transforms (`pad`, `jitter`, `random_scale`, `random_rotate`, `crop`, `compose`) are callables
  `t(images, generators)` drawing each image's randomness from its own generator;
- objectives (`channel`, `neuron`, `direction`, `direction_neuron`, `atlas_direction`,
  `class_logit`) give one value per image and add and scale;
- `optimize` runs Adam over a batch through a `Network` cut at the layers the objective reads,
  with an optional learning-rate schedule (`warmup_cosine`) and per-image early stopping
  (`EarlyStop`).

    objective = channel("blocks.10", 7)
    network = Network.for_objective(model, objective, normalise=preprocess.normalise)
    generators = make_generators(range(4))  # 4 images, one seed each
    vis = optimize(network, objective, fourier_image(64, generators, device=network.device),
                   generators=generators, transform=standard_transforms(64), steps=256)
    vis.images  # (4, 3, 64, 64) in [0, 1]
"""

from .objectives import (LOGITS, Objective, at_position, atlas_direction, channel, class_logit, cosine_at,
                         direction, direction_neuron, neuron)
from .optimize import Network, Visualization, evaluate, frozen, optimize
from .param import (COLOR_CORRELATION, ImageFn, decorrelate_colors, fft_frequencies, fourier_image, make_generators,
                    pixel_image)
from .schedule import EarlyStop, Schedule, constant, warmup_cosine
from .transform import (Transform, compose, crop, jitter, pad, random_affine, random_rotate, random_scale,
                        standard_transforms, uniform_rows)

__all__ = [
    "COLOR_CORRELATION",
    "EarlyStop",
    "LOGITS",
    "ImageFn",
    "Network",
    "Objective",
    "Schedule",
    "Transform",
    "Visualization",
    "at_position",
    "atlas_direction",
    "channel",
    "class_logit",
    "compose",
    "constant",
    "cosine_at",
    "crop",
    "decorrelate_colors",
    "direction",
    "direction_neuron",
    "evaluate",
    "fft_frequencies",
    "fourier_image",
    "frozen",
    "jitter",
    "make_generators",
    "neuron",
    "optimize",
    "pad",
    "pixel_image",
    "random_affine",
    "random_rotate",
    "random_scale",
    "standard_transforms",
    "uniform_rows",
    "warmup_cosine",
]
