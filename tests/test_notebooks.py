"""Every notebook, top to bottom, in smoke mode (1 epoch, the small test mini set), in order."""

import papermill as pm
import pytest

from gradcam_tut.cli import NOTEBOOKS

NAMES = sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
FIGURES = {
    "01": ["01_image_and_mask.png", "01_batch.png", "01_confusion_matrix.png"],
    "02": ["02_layer4_by_hand.png"],
    "03": ["03_layer_grid_pred.png", "03_layer_grid_runner_up.png", "03_layer_grid_shared.png"],
    "04": ["04_top_losses_gradcam.png"],
}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def test_all_notebooks_found():
    assert [n[:2] for n in NAMES] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, out, mini_dest):
    params = {"smoke": True, "data_path": str(mini_dest), "out_dir": str(out), "epochs": 1}
    nb = pm.execute_notebook(NOTEBOOKS / name, out / name, parameters=params,
                             cwd=NOTEBOOKS, progress_bar=False, kernel_name="python3")
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "mode: smoke (asked for smoke)" in printed
    for fig in FIGURES[name[:2]]:
        assert (out / "figures" / fig).stat().st_size > 1000, fig
    if name.startswith("02"):
        assert "equals grad_cam: True" in printed and "bn1 equals grad_cam: True" in printed
        assert "hooks left: 0" in printed
    if name.startswith("03"):
        assert "same maps: True" in printed
