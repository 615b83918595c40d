"""The offline default model on the shared ImageNet sample (slow: the real network, real images)."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import atlas.collect as collect
from atlas.config import load_config
from atlas.corpus import find_images, iter_batches
from atlas.layers import LayerTap
from atlas.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "imagenet-sample"


@pytest.mark.slow
def test_demo_collect_labels_the_sample_like_a_correctly_wired_lite0(tmp_path):
    """Wired right, Lite0's top-1 matches about 88% of the labels; wrong padding or mean/std: 70-80%."""
    config = load_config(ROOT / "configs" / "demo.toml", [
        f"run_dir={tmp_path / 'demo'}", f"images={SAMPLE}", "collect.attribution=false",
        "collect.samples_per_image=2"])
    lines = []
    summary = collect.run(config, log=lines.append)
    assert summary.n_images == 500 and summary.n_ok == 500
    assert summary.accuracy is not None and summary.accuracy >= 0.85, lines
    assert any("accuracy" in line for line in lines)
    with h5py.File(config.run_dir / "activations.h5", "r") as h5:
        assert h5.attrs["complete"] and h5.attrs["model"] == "efficientnet_lite0"
        assert h5["layers/blocks.10/acts"].shape == (1000, 112)
        assert h5["layers/blocks.10/acts"].dtype == np.float16
        assert h5["layers/blocks.10/acts"].chunks is not None
        assert h5["layers/blocks.10/yx"][()].max() <= 12  # 14x14 map, border 1
        assert (h5["images/label"][()] >= 0).all() and h5["classes/wnid"].shape == (1000,)


@pytest.mark.slow
def test_attribution_on_the_pretrained_model_matches_jvp():
    model = load_model("efficientnet_lite0")
    records = find_images(SAMPLE, limit=2)
    x = next(iter_batches(records, model.preprocess, 2, workers=0)).pixels
    tap = LayerTap(model.module, ["blocks.10"])
    with torch.no_grad():
        out = tap.run(x, logits=True)
    yx = torch.tensor([[[3, 4], [7, 7]], [[1, 12], [10, 2]]])
    got = tap.attribute("blocks.10", out, yx)
    h = out.acts["blocks.10"]
    expected = torch.empty_like(got)
    for j in range(2):
        t = torch.zeros_like(h)
        for b in range(2):
            t[b, :, yx[b, j, 0], yx[b, j, 1]] = h[b, :, yx[b, j, 0], yx[b, j, 1]]
        expected[:, j] = torch.func.jvp(lambda h_: tap.rest["blocks.10"](h_), (h,), (t,))[1]
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
