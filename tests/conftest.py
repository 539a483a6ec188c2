import gc
import shutil
import sys

import pytest
import torch
import torchvision


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    """A test that opens a page of headless Chromium (a `page` fixture) is marked `browser`:
    `make test-fast` leaves it out, `make test` installs Chromium and runs it."""
    for item in items:
        if "page" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)


# jsonschema (under nbformat, papermill) imports its optional IRI checker, which compiles a
# grammar on import, seconds of CPU. No schema the tests meet has an IRI format: left out.
sys.modules.setdefault("rfc3987_syntax", None)


def pytest_configure(config):
    """No garbage collection while the test modules import fastai, timm and the rest: what an
    import makes lives to the end, so a full collection then frees nothing (and walks more
    each time). Resumed once the tests are collected (`pytest_collection_finish`)."""
    gc.disable()


def pytest_collection_finish(session):
    """What is loaded by now lives to the end: frozen out of the garbage collector's sight,
    so that each full collection during the tests walks only what the tests made."""
    gc.freeze()
    gc.enable()


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory):
    """The image check's cache (`images.cache_dir()`, read at each call) in a temporary folder,
    for the notebooks' kernels too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=9).eval()


@pytest.fixture(scope="session")
def resnet34():
    torch.manual_seed(1)
    return torchvision.models.resnet34(num_classes=9).eval()


@pytest.fixture
def batch():
    torch.manual_seed(2)
    return torch.randn(3, 3, 64, 64)


@pytest.fixture(scope="session")
def mini_dest(tmp_path_factory):
    """A small mini fish set (6 per class, 64x48), made once per test session."""
    from gradcam_tut.tool.mini_fish import MiniFishSpec, make_mini_fish

    dest = tmp_path_factory.mktemp("mini") / "mini_fish"
    make_mini_fish(dest, MiniFishSpec(per_class=6, width=64, height=48), progress=False)
    return dest


@pytest.fixture(scope="session")
def mini_root(mini_dest):
    return mini_dest / "Fish_Dataset" / "Fish_Dataset"


@pytest.fixture(scope="session")
def tiny_model_file(mini_root, tmp_path_factory):
    """A resnet18 trained one epoch on the mini set at 32 px, exported."""
    from torchvision.models import resnet18

    from gradcam_tut.tool.train import train_fish

    model_file = tmp_path_factory.mktemp("model") / "fish.pkl"
    train_fish(mini_root, arch=resnet18, epochs=1, size=32, bs=8, pretrained=False,
               export_to=model_file, num_workers=0)
    return model_file


@pytest.fixture(scope="session")
def tiny_learner(tiny_model_file):
    from gradcam_tut.tool.train import load_fish_learner

    return load_fish_learner(tiny_model_file)


@pytest.fixture
def images(mini_root, tmp_path):
    """A folder of 2 fish images to explain (with --grids, each draws a grid: the slow part)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in sorted((mini_root / "Trout" / "Trout").iterdir())[:2]:
        shutil.copy(f, folder / f.name)
    return folder
