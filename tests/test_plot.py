import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from gradcam_tut.plot import (
    heat_cmap,
    image_hwc,
    mark_peak,
    new_figure,
    plot_layer_grid,
    plot_localization,
)

matplotlib.use("Agg")


def test_layer_grid_figure_and_png(tmp_path):
    image = torch.rand(3, 40, 60)
    maps = [torch.rand(20, 30), torch.rand(5, 8), torch.zeros(3, 3)]  # one map all zero
    fig = plot_layer_grid(image, maps, titles=["a", "b", "c"], ncols=2, save=tmp_path / "g.png")
    assert isinstance(fig, Figure) and plt.get_fignums() == []  # nothing left in pyplot
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [
        "image", f"a · 20x30 · max {maps[0].max():.2g}", f"b · 5x8 · max {maps[1].max():.2g}",
        "c · 3x3 · max 0"]
    assert (tmp_path / "g.png").stat().st_size > 1000
    heat = panels[3].get_images()[1].get_array()
    assert heat.shape == (40, 60) and float(heat.max()) == 0.0  # zero map: no NaN


def test_drawn_values_and_opacity_of_a_known_map():
    image = torch.zeros(3, 2, 2)
    maps = [torch.tensor([[0.0, 1.0], [2.0, 4.0]]), torch.tensor([[0.0, 2.0], [2.0, 2.0]])]
    own = plot_layer_grid(image, maps, colorbar=False)  # the image's size: not resampled
    drawn = [ax.get_images()[1] for ax in own.axes[1:3]]
    np.testing.assert_allclose(drawn[0].get_array(), [[0, 0.25], [0.5, 1]])  # / its own max
    np.testing.assert_allclose(drawn[1].get_array(), [[0, 1], [1, 1]])
    alpha = drawn[0].to_rgba(drawn[0].get_array())[..., 3]
    np.testing.assert_allclose(alpha, 0.85 * np.sqrt([[0, 0.25], [0.5, 1]]), atol=0.01)
    shared = plot_layer_grid(image, maps, shared_scale=True, colorbar=False)
    np.testing.assert_allclose(shared.axes[2].get_images()[1].get_array(),
                               [[0, 0.5], [0.5, 0.5]])  # / the largest of both maps


def test_shared_scale_keeps_relative_strength():
    image = torch.rand(3, 8, 8)
    maps = [torch.ones(4, 4), 0.5 * torch.ones(4, 4)]
    shared = plot_layer_grid(image, maps, shared_scale=True, colorbar=False)
    own = plot_layer_grid(image, maps, colorbar=False)
    top = [float(ax.get_images()[1].get_array().max()) for ax in shared.axes[1:3]]
    assert top == [1.0, 0.5]
    assert [float(ax.get_images()[1].get_array().max()) for ax in own.axes[1:3]] == [1.0, 1.0]


def test_image_hwc_scales_by_dtype():
    dark = np.ones((4, 4, 3), dtype=np.uint8)  # a dark 0..255 image, max 1
    assert image_hwc(dark).max() == pytest.approx(1 / 255)
    assert image_hwc(torch.ones(1, 3, 4, 4)).shape == (4, 4, 3)


def test_overlay_is_transparent_where_the_map_is_zero_and_low_values_show():
    cmap = heat_cmap()
    assert cmap(0.0)[3] == 0.0 and cmap(1.0)[3] == pytest.approx(0.85)
    # opacity grows with the square root: a tenth of the peak is still a third as opaque, so
    # a map whose mass is spread thinly over the water does not look empty there
    assert cmap(0.1)[3] == pytest.approx(0.85 * 0.1**0.5, abs=0.02)


def test_mask_outline_on_every_panel():
    image, mask = torch.rand(3, 16, 16), torch.zeros(16, 16)
    mask[4:10, 4:12] = 1
    fig = plot_layer_grid(image, [torch.rand(4, 4), torch.rand(2, 2)], mask=mask, colorbar=False)
    assert [len(ax.collections) for ax in fig.axes] == [1, 1, 1]
    assert fig.axes[0].get_title() == "image · mask outline"



def test_localization_chart_draws_the_report_it_is_given():
    report = pd.DataFrame({"map": ["8x8", "1x1"], "pointing": [0.5, 0.25],
                           "pointing_tol": [0.75, 0.5], "energy": [0.4, 0.3],
                           "chance": 0.2, "centre": 0.3, "centre_tol": 0.4, "images": 8},
                          index=pd.Index(["layer1", "layer4"], name="layer"))
    fig = plot_localization(report)
    bars = [[p.get_height() for p in ax.patches] for ax in fig.axes]
    assert bars == [[0.75, 0.5, 0.5, 0.25], [0.4, 0.3]]  # within tolerance behind, then exact
    assert fig._suptitle.get_text() == "Grad-CAM against the GT masks, 8 images"


def test_mark_peak_inside_outside_and_on_an_all_zero_map():
    heat, mask = torch.zeros(6, 6), torch.zeros(6, 6, dtype=torch.bool)
    heat[1, 4], mask[0:3, 3:6] = 1.0, True
    fig = new_figure()
    ax = fig.subplots()
    mark_peak(ax, heat, mask)
    mark_peak(ax, heat, ~mask)
    mark_peak(ax, heat)
    mark_peak(ax, torch.zeros(6, 6), mask)  # no peak: no marker
    drawn = [(ln.get_xdata()[0], ln.get_ydata()[0], ln.get_marker(), ln.get_color())
             for ln in ax.lines]
    assert drawn == [(4, 1, "o", "lime"), (4, 1, "x", "red"), (4, 1, "o", "white")]


def test_layer_grid_marks_peaks_outlines_a_region_and_greys_the_image():
    """06's grid: each map's peak marked, the mark's outline on every panel, the maps over the
    image in grey while the first panel keeps its colours."""
    image = torch.zeros(3, 16, 16)
    image[0] = 1.0  # red
    region = torch.zeros(16, 16)
    region[:4, :4] = 1
    fig = plot_layer_grid(image, [torch.rand(4, 4), torch.rand(2, 2)], peaks=True,
                          region=region, grey=True, colorbar=False)
    first, *panels = fig.axes
    assert all(len(ax.lines) == 1 for ax in panels)  # one peak marker each
    assert all(len(ax.collections) == 2 for ax in fig.axes)  # the outline: black, white dashes
    assert first.images[0].get_array()[0, 0].tolist() == [1.0, 0.0, 0.0]  # in colour
    under = panels[0].images[0].get_array()[0, 0].tolist()
    assert under[0] == under[1] == under[2] < 1.0  # grey, darkened
    plain = plot_layer_grid(image, [torch.rand(4, 4)], region=torch.zeros(16, 16),
                            colorbar=False)
    assert not plain.axes[1].lines and not plain.axes[1].collections  # no peak, empty region
