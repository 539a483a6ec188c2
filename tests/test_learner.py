"""What runs a fastai Learner: the grid and its patch, the top losses, the masks' DataLoader,
the localization report, the pointing gallery; and the import arrows among the modules."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.interpret import ClassificationInterpretation
from matplotlib.figure import Figure

from gradcam_tut import grad_cam
from gradcam_tut.learner import gradcam_grid, localization_report, mask_dl, plot_pointing_gallery
from gradcam_tut.metrics import pointing_game
from gradcam_tut.receptive_field import cell_centres, place

PACKAGE = Path(__file__).parents[1] / "gradcam_tut"
ALLOWED = {"metrics": set(), "plot": {"cam", "metrics", "receptive_field"},
           "learner": {"cam", "fish_layout", "images", "layers", "metrics", "plot",
                       "receptive_field"}}


def package_imports(module: str) -> set[str]:
    """The package's modules that `module` imports at its top level."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found


def test_import_arrows_point_down():
    """learner -> plot, metrics, cam, layers, images, fish_layout; plot draws and never runs a
    Learner; metrics is tensor maths and imports nothing of the package."""
    for module, allowed in ALLOWED.items():
        assert package_imports(module) <= allowed, module
    assert "plot" not in package_imports("metrics")
    # what metrics and plot load in a fresh interpreter: test_house.py's
    # test_the_light_files_load_only_what_they_need


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
    from gradcam_tut.tool.data import fish_dataloaders

    tiny_learner.dls = fish_dataloaders(mini_root, size=32, bs=8, num_workers=0)
    interp = ClassificationInterpretation.from_learner(tiny_learner)
    fig = interp.plot_top_losses_gradcam(k=3)
    assert len(fig.axes) == 13 and fig.axes[-1].get_label() == "<colorbar>"
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("true ") and titles[1].startswith("pred ")
    assert titles[3].startswith("why not ")  # y_pred - y_true, or - y_runner_up when right
    assert " · max " in titles[1] and "at layer4" in fig._suptitle.get_text()




def test_localization_report_on_a_trained_model(tiny_learner, mini_root):
    from gradcam_tut.tool.data import fish_dataloaders

    tiny_learner.dls = fish_dataloaders(mini_root, size=32, bs=8, num_workers=0)
    dl = mask_dl(tiny_learner)
    xb, yb, mb = dl.one_batch()
    assert mb.shape == (8, 32, 32) and set(mb.unique().tolist()) <= {0, 1}
    report = localization_report(tiny_learner, layers=["layer1", "layer4"])
    assert list(report.index) == ["layer1", "layer4"]
    assert list(report.columns) == ["map", "pointing", "energy", "zero_maps", "chance",
                                    "centre", "images", "empty_masks"]
    assert report["map"].tolist() == ["8x8", "1x1"]
    n = len(tiny_learner.dls.valid_ds)
    assert (report["images"] == n).all()
    assert report[["pointing", "energy", "zero_maps", "chance"]].stack().between(0, 1).all()
    # the same numbers by hand, from the same batches
    hits, total = torch.zeros(()), 0
    for xb, yb, mb in dl:
        (m,) = grad_cam(tiny_learner.model, xb, "layer1", yb)
        where = cell_centres(tiny_learner.model, "layer1", mb.shape[-2:])["layer1"]
        hits += pointing_game(place(m, mb.shape[-2:], where), mb.bool()).sum()
        total += len(xb)
    assert report.loc["layer1", "pointing"] == pytest.approx((hits / total).item())
    pred = localization_report(tiny_learner, layers=["layer4"], targets="pred")
    assert pred["images"].item() == n
    tol = localization_report(tiny_learner, layers=["layer1", "layer4"], tolerance=4)
    assert list(tol.columns) == ["map", "pointing", "pointing_tol", "energy", "zero_maps",
                                 "chance", "centre", "centre_tol", "images", "empty_masks"]
    assert tol["pointing"].tolist() == report["pointing"].tolist()
    assert (tol["pointing_tol"] >= tol["pointing"]).all()
    assert (tol["centre_tol"] >= tol["centre"]).all()
    with pytest.raises(ValueError, match="'true'"):
        localization_report(tiny_learner, targets="label")




def test_empty_masks_are_skipped_not_missed(tiny_learner, mini_root):
    from gradcam_tut.tool.layout import image_files

    files = list(image_files(mini_root))[:6]
    full = localization_report(tiny_learner, mask_dl(tiny_learner, files), layers=["layer4"])

    def half_empty(f):
        from gradcam_tut.images import fish_mask

        m = fish_mask(f)
        return m if files.index(f) % 2 else type(m).create(np.zeros_like(np.asarray(m)))

    some = localization_report(tiny_learner, mask_dl(tiny_learner, files, half_empty),
                               layers=["layer4"])
    assert full["images"].iloc[0] == 6 and full["empty_masks"].iloc[0] == 0
    assert some["images"].iloc[0] == 3 and some["empty_masks"].iloc[0] == 3


def test_pointing_gallery_hits_and_misses(tiny_learner, mini_root):
    from gradcam_tut.tool.layout import image_files

    dl = mask_dl(tiny_learner, list(image_files(mini_root))[::3], bs=6)
    fig = plot_pointing_gallery(tiny_learner, layer="layer3", n=2, dl=dl)
    assert isinstance(fig, Figure) and "at layer3" in fig._suptitle.get_text()
    titles = [ax.get_title() for ax in fig.axes]
    # the same hits as the pointing game on the same placed maps
    hits = []
    for xb, yb, mb in dl:
        (m,) = grad_cam(tiny_learner.model, xb, "layer3", yb)
        where = cell_centres(tiny_learner.model, "layer3", mb.shape[-2:])["layer3"]
        hits += pointing_game(place(m, mb.shape[-2:], where), mb.bool()).tolist()
    shown = [t.split(" · ")[0] for t in titles if t]
    assert shown.count("hit") == min(2, sum(hits))
    assert shown.count("miss") == min(2, len(hits) - sum(hits))
    assert all(t.startswith("hit") for t in titles[:2] if t)
