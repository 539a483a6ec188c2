import matplotlib
import numpy as np
import pytest
import torch
from fastai.interpret import ClassificationInterpretation
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from gradcam_tut import grad_cam
from gradcam_tut.cam import class_index
from gradcam_tut.plot import gradcam_grid, heat_cmap, image_hwc, plot_layer_grid
from gradcam_tut.receptive_field import cell_centres, place

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


def test_class_index():
    vocab = ["Shrimp", "Trout"]
    assert class_index(vocab, "Trout") == 1 and class_index(vocab, 0) == 0
    with pytest.raises(ValueError, match=r"no class named 'Tuna': use one of \['Shrimp'"):
        class_index(vocab, "Tuna")
    with pytest.raises(ValueError, match="out of range"):
        class_index(vocab, 2)


def test_gradcam_grid_on_a_learner(tiny_learner, mini_root, tmp_path):
    img = sorted((mini_root / "Trout" / "Trout").iterdir())[0]
    fig = tiny_learner.gradcam(img, target="Trout", save=tmp_path / "grid.png")
    titles = [ax.get_title().split(" · ")[0] for ax in fig.axes if ax.get_title()]
    assert titles == ["image", "conv1", "bn1", "relu", "maxpool",
                      "layer1", "layer2", "layer3", "layer4"]
    assert fig.axes[8].get_title().startswith("layer4 · 1x1 · max ")  # 32 px input
    assert all(ax.collections for ax in fig.axes[:9])  # a mini fish image: its mask outline
    assert "map for Trout" in fig._suptitle.get_text()
    # the layer3 panel shows grad_cam's 2x2 map for Trout (not all zero, not flat), each cell
    # placed at its receptive field's centre, scaled to its max
    x, model = tiny_learner.dls.test_dl([img]).one_batch()[0], tiny_learner.model
    m = grad_cam(model, x, "layer3", tiny_learner.dls.vocab.o2i["Trout"])[0]
    assert m.shape == (1, 2, 2) and m.max() > m.min()
    placed = place(m, x.shape[-2:], cell_centres(model, "layer3", x.shape[-2:])["layer3"])[0]
    shown = torch.as_tensor(fig.axes[7].get_images()[1].get_array())
    assert fig.axes[7].get_title().startswith("layer3 · 2x2 · max ")
    torch.testing.assert_close(shown, placed / placed.max())
    with pytest.raises(ValueError, match="no class named"):
        gradcam_grid(tiny_learner, img, target="Tuna")
    why = tiny_learner.gradcam(img, layers=["layer3"], target="Trout", contrast="Shrimp")
    assert "map for Trout" in why._suptitle.get_text()
    assert "rather than Shrimp" in why._suptitle.get_text()
    assert (tmp_path / "grid.png").is_file()
    tiny_learner.model.train()
    gradcam_grid(tiny_learner, img, layers=["layer4"])
    assert tiny_learner.model.training  # the learner's mode is left as it was
    tiny_learner.model.eval()


@pytest.mark.slow
def test_top_losses_gradcam(tiny_learner, mini_root):
    from gradcam_tut.data import fish_dataloaders

    tiny_learner.dls = fish_dataloaders(mini_root, size=32, bs=8, num_workers=0)
    interp = ClassificationInterpretation.from_learner(tiny_learner)
    fig = interp.plot_top_losses_gradcam(k=3)
    assert len(fig.axes) == 13 and fig.axes[-1].get_label() == "<colorbar>"
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("true ") and titles[1].startswith("pred ")
    assert titles[3].startswith("why not ")  # y_pred - y_true, or - y_runner_up when right
    assert " · max " in titles[1] and "at layer4" in fig._suptitle.get_text()


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

