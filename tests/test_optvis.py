"""atlas.optvis: parameterisations, transforms, objectives and the optimisation loop on tiny inputs."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from atlas import optvis as ov
from tiny import make


def gens(*seeds):
    return ov.make_generators(seeds)


def smooth_images(b=3, size=20):
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([torch.sin(3 * xs + 2 * ys), torch.cos(4 * ys), xs * ys])
    return torch.stack([base + 0.1 * i for i in range(b)]).float()


# --------------------------------------------------------------------------------- parameterisations


@pytest.mark.parametrize("factory", [ov.fourier_image, ov.pixel_image])
def test_parameterisation_shapes_range_and_determinism(factory):
    params, image_fn = factory((12, 10), gens(1, 2, 3))
    image = image_fn().detach()
    assert image.shape == (3, 3, 12, 10) and image.dtype == torch.float32
    assert float(image.min()) > 0 and float(image.max()) < 1
    assert all(p.requires_grad and p.is_leaf for p in params)
    again = factory((12, 10), gens(1, 2, 3))[1]()
    assert torch.equal(image, again)  # same seeds, same start
    assert not torch.equal(image[0], image[1])  # different seeds, different start


@pytest.mark.parametrize("factory", [ov.fourier_image, ov.pixel_image])
def test_parameterisation_row_depends_on_its_generator_only(factory):
    batch = factory(16, gens(5, 6, 7))[1]()
    alone = factory(16, gens(6))[1]()
    assert torch.equal(batch[1], alone[0])


def test_fourier_image_gradients_reach_the_spectrum():
    params, image_fn = ov.fourier_image(8, gens(0), sd=0.5)
    image_fn().sum().backward()
    assert params[0].shape == (1, 3, 8, 5, 2)
    assert params[0].grad is not None and float(params[0].grad.abs().sum()) > 0


def test_fft_frequencies_and_colour_decorrelation():
    freqs = ov.fft_frequencies(4, 6)
    assert freqs.shape == (4, 4) and freqs[0, 0] == 0 and freqs[0, 1] == pytest.approx(1 / 6)
    assert freqs[1, 0] == pytest.approx(1 / 4)
    x = torch.randn(2, 3, 4, 5)
    expected = torch.einsum("ij,bjhw->bihw", torch.as_tensor(ov.COLOR_CORRELATION), x)
    torch.testing.assert_close(ov.decorrelate_colors(x), expected)
    assert np.linalg.norm(ov.COLOR_CORRELATION, axis=0).max() == pytest.approx(1.0)


# --------------------------------------------------------------------------------- transforms


def test_pad_shape_and_value():
    x = torch.rand(2, 3, 5, 6)
    out = ov.pad(2)(x, gens(0, 1))
    assert out.shape == (2, 3, 9, 10)
    assert torch.equal(out[:, :, 2:-2, 2:-2], x) and float(out[0, 0, 0, 0]) == 0.5
    assert ov.pad(1, mode="reflect")(x, gens(0, 1)).shape == (2, 3, 7, 8)
    with pytest.raises(ValueError):
        ov.pad(1, mode="wrap")


def test_jitter_is_a_window_per_image_and_deterministic():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = ov.jitter(3)(x, gens(4, 5))
    assert out.shape == (2, 1, 5, 5)
    for i in range(2):  # each output is a window of its own input
        dy, dx = divmod(int(out[i, 0, 0, 0] - x[i, 0, 0, 0]), 8)
        assert 0 <= dy <= 3 and 0 <= dx <= 3
        assert torch.equal(out[i], x[i, :, dy:dy + 5, dx:dx + 5])
    assert torch.equal(out, ov.jitter(3)(x, gens(4, 5)))
    assert torch.equal(out[1], ov.jitter(3)(x[1:], gens(5))[0])


def test_random_scale_and_rotate_keep_size_and_constants():
    x = torch.full((2, 3, 9, 9), 0.3)
    for t in (ov.random_scale(0.3), ov.random_rotate(30)):
        out = t(x, gens(0, 1))
        assert out.shape == x.shape
        torch.testing.assert_close(out, x)
    y = smooth_images(2)
    assert torch.equal(ov.random_scale(0)(y, gens(0, 1)), y)
    assert torch.equal(ov.random_rotate(0)(y, gens(0, 1)), y)
    assert not torch.allclose(ov.random_rotate(30)(y, gens(0, 1)), y)


def test_random_rotate_rotates_about_the_centre():
    # A bright dot right of centre on a 21x21 image lands on the circle of its radius.
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 16] = 1.0
    out = ov.random_rotate(90)(x, gens(3))
    ys, xs = torch.meshgrid(torch.arange(21.0), torch.arange(21.0), indexing="ij")
    w = out[0, 0] / out[0, 0].sum()
    cy, cx = float((w * ys).sum()), float((w * xs).sum())
    assert math.hypot(cy - 10, cx - 10) == pytest.approx(6, abs=0.5)


def test_crop_takes_the_centre():
    x = torch.arange(36.0).view(1, 1, 6, 6)
    assert torch.equal(ov.crop(2)(x, gens(0)), x[..., 2:4, 2:4])
    with pytest.raises(ValueError):
        ov.crop(8)(x, gens(0))


def test_compose_applies_in_order():
    x = torch.rand(1, 3, 4, 4)
    out = ov.compose([ov.pad(2), ov.crop(6)])(x, gens(0))
    assert out.shape == (1, 3, 6, 6) and torch.equal(out[..., 1:5, 1:5], x)


def test_random_affine_equals_the_sequential_transforms():
    x = smooth_images(3, 24)
    sequential = ov.compose([ov.jitter(3), ov.random_scale(1e-6), ov.random_rotate(1e-6), ov.jitter(3), ov.crop(14)])
    fused = ov.random_affine(14, jitter_px=3, scale=1e-6, degrees=1e-6)
    torch.testing.assert_close(fused(x, gens(1, 2, 3)), sequential(x, gens(1, 2, 3)), atol=1e-4, rtol=0)
    # With real scaling and rotation they differ only by resampling once instead of three times.
    sequential = ov.compose([ov.jitter(3), ov.random_scale(0.2), ov.random_rotate(20), ov.jitter(3), ov.crop(14)])
    fused = ov.random_affine(14, jitter_px=3, scale=0.2, degrees=20)
    diff = (fused(x, gens(1, 2, 3)) - sequential(x, gens(1, 2, 3))).abs().mean()
    assert float(diff) < 0.01


def test_standard_transforms_are_per_image_deterministic_and_differentiable():
    t = ov.standard_transforms(16, pad_px=3, jitter_px=3, scale=0.2, rotate=15)
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    out = t(x, gens(7, 8, 9))
    assert out.shape == (3, 3, 16, 16)
    assert torch.equal(out, t(x, gens(7, 8, 9)))
    assert torch.allclose(out[2], t(x[2:], gens(9))[0])  # independent of the rest of the batch
    out.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with pytest.raises(ValueError):
        ov.standard_transforms(16, pad_px=1, jitter_px=2)


# --------------------------------------------------------------------------------- objectives


def test_objectives_on_known_activations():
    h = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).view(2, 3, 3, 3)
    acts = {"a": h, ov.LOGITS: torch.tensor([[1.0, 5.0], [2.0, -1.0]])}
    torch.testing.assert_close(ov.channel("a", 1)(acts), h[:, 1].mean(dim=(1, 2)))
    torch.testing.assert_close(ov.neuron("a", 2)(acts), h[:, 2, 1, 1])
    torch.testing.assert_close(ov.neuron("a", 0, x=2, y=0)(acts), h[:, 0, 0, 2])
    v = torch.tensor([1.0, -1.0, 0.5])
    torch.testing.assert_close(ov.direction("a", v)(acts), torch.einsum("bchw,c->b", h, v) / 9)
    per_image = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    torch.testing.assert_close(ov.direction_neuron("a", per_image)(acts), torch.stack([h[0, 0, 1, 1], h[1, 2, 1, 1]]))
    torch.testing.assert_close(ov.class_logit(1)(acts), torch.tensor([5.0, -1.0]))


def test_objectives_add_and_scale():
    acts = {"a": torch.rand(2, 3, 4, 4), "b": torch.rand(2, 2, 2, 2)}
    one, two = ov.channel("a", 0), ov.neuron("b", 1)
    torch.testing.assert_close((one + 2 * two)(acts), one(acts) + 2 * two(acts))
    torch.testing.assert_close((one - two * 0.5)(acts), one(acts) - 0.5 * two(acts))
    torch.testing.assert_close(sum([one, two])(acts), one(acts) + two(acts))
    torch.testing.assert_close((-one)(acts), -one(acts))
    assert (one + two).layers == ("a", "b")


@pytest.mark.parametrize("whiten", [False, True])
def test_atlas_objective_equals_a_direct_computation(whiten):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((4, 5, 3, 4)).astype(np.float32)
    v = rng.standard_normal((4, 5)).astype(np.float32)
    s = rng.standard_normal((5, 5)).astype(np.float32) if whiten else None
    p = 3.0
    got = ov.atlas_direction("a", v, p, whitening=s)({"a": torch.from_numpy(h)}).numpy()
    centre = h[:, :, 1, 2].astype(np.float64)  # H // 2 = 1, W // 2 = 2
    w = v.astype(np.float64) @ s if whiten else v.astype(np.float64)
    dot = (centre * w).sum(axis=1)
    cos = dot / (np.linalg.norm(centre, axis=1) * np.linalg.norm(w, axis=1))
    np.testing.assert_allclose(got, dot * np.maximum(0.1, cos) ** p, rtol=1e-4)
    assert (cos < 0.1).any()  # the floor is exercised


def test_vectors_must_fit_the_activations():
    with pytest.raises(ValueError, match="do not fit"):
        ov.direction_neuron("a", torch.ones(3, 5))({"a": torch.rand(2, 5, 3, 3)})


# --------------------------------------------------------------------------------- optimisation


def test_optimize_raises_the_objective_and_leaves_the_model_alone():
    model = make()
    model.train()
    model.requires_grad_(False)
    model.fc.weight.requires_grad_(True)
    calls = []
    handle = model.fc.register_forward_hook(lambda *args: calls.append(1))
    objective = ov.channel("deep", 1)
    network = ov.Network.for_objective(model, objective)
    g = gens(0, 1)
    params, image_fn = ov.fourier_image(16, g)
    with torch.no_grad():
        before = objective(ov.evaluate(network, image_fn()))
    vis = ov.optimize(network, objective, (params, image_fn), generators=g,
                      transform=ov.standard_transforms(16, pad_px=2, jitter_px=2), steps=40, lr=0.1)
    after = objective(ov.evaluate(network, vis.images))
    handle.remove()
    assert (after > before + 0.5).all(), (before, after)
    assert vis.images.shape == (2, 3, 16, 16) and vis.history.shape == (40,)
    assert float(vis.history[-5:].mean()) > float(vis.history[:5].mean())
    assert not calls  # the network stops at the layer it needs
    assert model.training and model.fc.weight.requires_grad and not model.fc.bias.requires_grad
    assert all(p.grad is None for p in model.parameters())  # gradients for the image only


def test_optimize_with_logits_and_pixels():
    model = make()
    objective = ov.class_logit(3) + 0.1 * ov.channel("deep", 0)
    network = ov.Network.for_objective(model, objective)
    g = gens(4)
    params, image_fn = ov.pixel_image(8, g)
    with torch.no_grad():
        before = objective(ov.evaluate(network, image_fn()))
    vis = ov.optimize(network, objective, (params, image_fn), generators=g, steps=20, lr=0.1)
    assert float(objective(ov.evaluate(network, vis.images))) > float(before)


def test_optimize_checks_layers_and_devices():
    model = make()
    network = ov.Network(model, ["features"])
    g = gens(0)
    with pytest.raises(ValueError, match="does not compute"):
        ov.optimize(network, ov.channel("deep", 0), ov.pixel_image(8, g), generators=g, steps=1)
    with pytest.raises(ValueError):
        ov.Network(nn.Identity(), [])


# --------------------------------------------------------------------------------- schedules, early stopping


def test_warmup_cosine_schedule_values():
    f = ov.warmup_cosine(11, warmup=2)
    assert [f(0), f(1)] == [0.5, 1.0]  # linear warm-up to the full rate
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.0)  # cosine from 1 down to 0 at the last step
    assert f(6) == pytest.approx(0.5)  # half way down the cosine (steps 2..10)
    assert ov.warmup_cosine(5, floor=0.1)(4) == pytest.approx(0.1) and ov.constant()(7) == 1.0
    with pytest.raises(ValueError):
        ov.warmup_cosine(4, warmup=4)


def test_early_stop_rise_and_stall_on_toy_histories():
    stop = ov.EarlyStop(window=2, min_rise=0.25)
    # columns: flat; rising by a third of the latest value per window; exactly at the threshold; falling
    history = torch.tensor([[1.0, 1.0, 0.75, 4.0],
                            [1.0, 1.0, 0.75, 4.0],
                            [1.0, 1.5, 1.0, 3.0],
                            [1.0, 1.5, 1.0, 3.0]])
    np.testing.assert_allclose(stop.rise(history).numpy(), [0.0, 1 / 3, 0.25, -1 / 3], rtol=1e-12)
    assert stop.stalled(history).tolist() == [True, False, False, True]
    assert not stop.stalled(history[:3]).any()  # fewer than two windows: nothing stops
    assert not ov.EarlyStop(2, 0.25, min_steps=5).stalled(history).any()
    with pytest.raises(ValueError):
        ov.EarlyStop(0, 0.1)


class _Recorder:
    """An objective that records each step's per-image values (steps x B)."""

    def __init__(self, objective):
        self.objective, self.values = objective, []
        self.layers, self.name = objective.layers, objective.name

    def __call__(self, acts):
        v = self.objective(acts)
        if torch.is_grad_enabled():
            self.values.append(v.detach().clone())
        return v


def test_early_stop_never_stops_an_image_still_rising_faster_than_the_threshold():
    model = make()
    directions = torch.tensor(np.random.default_rng(0).normal(size=(6, 4)), dtype=torch.float32)
    recorder = _Recorder(ov.atlas_direction("deep", directions))
    network = ov.Network.for_objective(model, recorder)
    g = gens(*range(6))
    stop = ov.EarlyStop(window=4, min_rise=0.02)
    vis = ov.optimize(network, recorder, ov.fourier_image(12, g), generators=g,
                      transform=ov.standard_transforms(12, pad_px=2, jitter_px=2), steps=48, lr=0.05,
                      early_stop=stop)
    history = torch.stack(recorder.values)  # (steps run, 6); a stopped image's later rows are not its own
    assert (vis.steps < 48).any() and (vis.steps <= 48).all()  # some stop, on this toy problem
    check_every = max(1, stop.window // 4)
    for i, ran in enumerate(vis.steps.tolist()):
        # at every check before its stop the image was still rising by at least min_rise per window
        for t in range(2 * stop.window, ran, check_every):
            if t < ran:
                assert float(stop.rise(history[:t, i:i + 1])) >= stop.min_rise
        if ran < 48:  # and it stopped only once it was not
            assert float(stop.rise(history[:ran, i:i + 1])) < stop.min_rise


def test_a_stopped_image_is_the_image_of_its_last_step():
    # Adam is elementwise and each image has its own generator: an image stopped after k steps is
    # the image a run of exactly k steps gives (constant learning rate, so k steps is the same path).
    model = make()
    directions = torch.tensor(np.random.default_rng(1).normal(size=(4, 4)), dtype=torch.float32)
    objective = ov.atlas_direction("deep", directions)
    network = ov.Network.for_objective(model, objective)
    transform = ov.standard_transforms(12, pad_px=2, jitter_px=2)
    g = gens(*range(4))
    stopped = ov.optimize(network, objective, ov.fourier_image(12, g), generators=g, transform=transform,
                          steps=48, lr=0.05, early_stop=ov.EarlyStop(window=4, min_rise=0.02))
    i = int(torch.argmin(stopped.steps))
    k = int(stopped.steps[i])
    assert k < 48
    g = gens(*range(4))
    full = ov.optimize(network, objective, ov.fourier_image(12, g), generators=g, transform=transform, steps=k,
                       lr=0.05)
    torch.testing.assert_close(stopped.images[i], full.images[i], atol=1e-5, rtol=0)


def test_bfloat16_autocast_stays_close_to_float32():
    # bf16 keeps 8 bits of mantissa: through a few steps the icon moves by a few 8-bit levels at most
    model = make()
    directions = torch.tensor(np.random.default_rng(2).normal(size=(3, 4)), dtype=torch.float32)
    objective = ov.atlas_direction("deep", directions)
    images = {}
    for autocast in (None, torch.bfloat16):
        network = ov.Network.for_objective(model, objective, autocast=autocast)
        g = gens(0, 1, 2)
        vis = ov.optimize(network, objective, ov.fourier_image(16, g), generators=g,
                          transform=ov.standard_transforms(16, pad_px=2, jitter_px=2), steps=10, lr=0.05)
        images[autocast] = vis.images
        acts = ov.evaluate(network, vis.images)["deep"]
        assert acts.dtype == torch.float32  # objectives see float32 whatever the autocast
    assert float((images[None] - images[torch.bfloat16]).abs().max()) < 4 / 255
