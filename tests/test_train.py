import warnings
from functools import partial
from urllib.error import URLError

import pytest
import torch
from torchvision.models import resnet18

from gradcam_tut.fish_layout import CLASSES
from gradcam_tut.tool.data import fish_dataloaders
from gradcam_tut.tool.train import fish_learner, fp16_wanted, load_fish_learner


def test_trained_learner_exports_and_loads(tiny_learner, mini_root):
    assert list(tiny_learner.dls.vocab) == list(CLASSES)
    _, idx, probs = tiny_learner.predict(sorted((mini_root / "Trout" / "Trout").iterdir())[0])
    assert probs.shape == (9,) and torch.isclose(probs.sum(), torch.tensor(1.0))


def test_fp16_only_on_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU behaviour")
    assert fp16_wanted("auto") is False
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        fp16_wanted(True)


def offline_resnet18(pretrained=False, **kwargs):
    """resnet18 as it behaves without internet: asking for weights fails to download."""
    if pretrained:
        raise URLError("Name or service not known")
    return resnet18(**kwargs)


def test_pretrained_falls_back_to_random_weights_offline(mini_root):
    dls = fish_dataloaders(mini_root, size=32, bs=4, num_workers=0)
    with pytest.warns(UserWarning, match="training from random weights"):
        learn, pretrained = fish_learner(dls, offline_resnet18, pretrained=True)
    assert pretrained is False and learn.model is not None
    with pytest.warns(UserWarning, match="pretrained functools.partial"):  # no __name__
        fish_learner(dls, partial(offline_resnet18), pretrained=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when random weights were asked for
        _, pretrained = fish_learner(dls, offline_resnet18, pretrained=False)
    assert pretrained is False


def test_load_missing_model_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebook 01"):
        load_fish_learner(tmp_path / "none.pkl")


@pytest.mark.slow
def test_training_is_reproducible(mini_root, tmp_path):
    """Seeded: the same data, seed and settings train the same weights (so the same maps)."""
    from gradcam_tut.tool.train import train_fish

    def weights(seed):
        learn = train_fish(mini_root, arch=resnet18, epochs=1, size=32, bs=8, pretrained=False,
                           seed=seed, num_workers=0)
        return torch.cat([p.detach().flatten() for p in learn.model.parameters()])

    first = weights(42)
    assert torch.equal(first, weights(42))
    assert not torch.equal(first, weights(7))
