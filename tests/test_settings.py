import json
import shutil
from contextlib import nullcontext
from dataclasses import replace
from urllib.error import URLError

import pytest
import torch
from torchvision.models import ResNet34_Weights, resnet34

from gradcam_tut import fish_layout
from gradcam_tut.tool import data, settings
from gradcam_tut.tool.data import find_fish_dataset
from gradcam_tut.tool.layout import scan_layout
from gradcam_tut.tool.settings import (
    SMOKE_ENV,
    RunSettings,
    decide_settings,
    pretrained_weights_available,
    run_settings,
)
from gradcam_tut.tool.train import fish_learner


def _offline(url, timeout):
    raise URLError("offline")


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(SMOKE_ENV, raising=False)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No request leaves the machine: the tests answer the same online and offline."""
    monkeypatch.setattr(settings, "urlopen", _offline)


def test_weights_are_available_when_their_url_answers(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # nothing cached
    asked = []

    def answering(url, timeout):
        asked.append((url, timeout))
        return nullcontext()  # a response: a context manager

    monkeypatch.setattr(settings, "urlopen", answering)
    assert pretrained_weights_available(timeout=0.5)
    assert asked == [(ResNet34_Weights.DEFAULT.url, 0.5)]
    monkeypatch.setattr(settings, "urlopen", _offline)
    assert not pretrained_weights_available(timeout=0.5)


def test_auto_mode_says_why(mini_dest, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU decision")
    s = run_settings(data=mini_dest, out=tmp_path)
    assert s.smoke and "no CUDA GPU" in s.reason and "no Fish Dataset found" in s.reason
    assert (s.size, s.pretrained) == (128, False) and s.model_file.parent.parent == tmp_path
    assert capsys.readouterr().out.startswith("mode: smoke (no CUDA GPU, no Fish Dataset found)")


def test_env_and_argument(mini_dest, monkeypatch):
    monkeypatch.setenv(SMOKE_ENV, "1")
    assert run_settings(data=mini_dest).reason == "asked for smoke"
    monkeypatch.setenv(SMOKE_ENV, "0")
    full = run_settings(data=mini_dest)
    assert not full.smoke and (full.size, full.pretrained) == (224, True)
    assert run_settings(smoke=True, data=mini_dest).smoke  # the argument wins


@pytest.mark.parametrize("value, smoke", [("1", True), ("TRUE", True), ("yes", True),
                                          ("on", True), ("0", False), ("False", False),
                                          ("no", False), ("off", False)])
def test_env_spellings(mini_dest, monkeypatch, value, smoke):
    monkeypatch.setenv(SMOKE_ENV, value)
    assert run_settings(data=mini_dest).smoke is smoke


def test_env_typo_is_an_error(mini_dest, monkeypatch):
    monkeypatch.setenv(SMOKE_ENV, "of")
    with pytest.raises(ValueError, match="GRADCAM_TUT_SMOKE='of': use 1/0, true/false"):
        run_settings(data=mini_dest)


def test_overrides(mini_dest):
    s = run_settings(smoke=True, data=mini_dest, epochs=1, size=None)
    assert (s.epochs, s.size) == (1, 128)  # None keeps the mode's value
    with pytest.raises(TypeError):
        run_settings(smoke=True, data=mini_dest, epoch=1)


def test_missing_data_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        run_settings(smoke=True, data=tmp_path / "nowhere")


@pytest.fixture
def real_layout(mini_root, tmp_path_factory):
    """The real dataset's layout, 6 per class: the mini set's class folders without its marker
    (the marker, not the images' size, tells a mini set from the real one)."""
    dest = tmp_path_factory.mktemp("real")
    shutil.copytree(mini_root, dest / "Fish_Dataset" / "Fish_Dataset")
    return dest


def test_cpu_mode_fine_tunes_imagenet_weights(real_layout, tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU decision")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    assert not pretrained_weights_available(timeout=0.5)  # offline (mocked), nothing cached
    s = run_settings(data=real_layout, out=tmp_path)
    assert s.mode == "smoke" and "no pretrained weights" in s.reason
    weights = tmp_path / "hub" / "checkpoints" / ResNet34_Weights.DEFAULT.url.rsplit("/", 1)[1]
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(resnet34().state_dict(), weights)  # random values: the logic is what is tested
    capsys.readouterr()
    s = run_settings(data=real_layout, out=tmp_path)
    assert (s.mode, s.smoke, s.pretrained, s.size, s.max_per_class) == ("cpu", False, True,
                                                                          160, 200)
    assert capsys.readouterr().out.startswith(
        "mode: cpu (no CUDA GPU, but the dataset and ImageNet weights are here")
    learn, pretrained = fish_learner(s.dataloaders(size=32, bs=8), resnet34, s.pretrained)
    assert pretrained  # read from torch's cache, no download, no fallback
    torch.testing.assert_close(learn.model[0][0].weight, torch.load(weights)["conv1.weight"])


def test_kaggle_mount_and_kagglehub_cache(mini_root, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", tmp_path / "data")
    monkeypatch.delenv("FISH_DATASET", raising=False)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setattr(data, "KAGGLE_INPUT", tmp_path / "kaggle" / "input" / "fish")
    versions = tmp_path / "kagglehub" / "datasets" / fish_layout.KAGGLE_HANDLE / "versions"
    for v in ("1", "2"):
        shutil.copytree(mini_root, versions / v / "Fish_Dataset" / "Fish_Dataset")
    assert find_fish_dataset(download=False) == versions / "2" / "Fish_Dataset" / "Fish_Dataset"
    shutil.copytree(mini_root, data.KAGGLE_INPUT / "Fish_Dataset" / "Fish_Dataset")
    assert find_fish_dataset(download=False) == data.KAGGLE_INPUT / "Fish_Dataset" / "Fish_Dataset"


def test_settings_file_round_trip(mini_dest, tmp_path):
    """Decided, written, read back: the same settings, the mode one fact (`smoke` follows it)."""
    s = decide_settings(smoke=True, data=mini_dest, out=tmp_path / "run", epochs=2)
    assert s.save(tmp_path / "run" / "settings.json") == tmp_path / "run" / "settings.json"
    loaded = RunSettings.load(tmp_path / "run" / "settings.json")
    assert loaded == s and loaded.smoke and (loaded.mode, loaded.epochs) == ("smoke", 2)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["settings.json"]  # no temp left
    assert not replace(s, mode="cpu").smoke


def test_the_settings_scan_their_data_once(mini_dest, mini_root, tmp_path, monkeypatch):
    """`masks`, `dataloaders` and `learner` read one `Layout`, scanned when first asked for."""
    s = decide_settings(smoke=True, data=mini_dest, out=tmp_path / "run")
    scans = []
    monkeypatch.setattr(settings, "scan_layout", lambda p: scans.append(p) or scan_layout(p))
    assert s.masks and s.layout.root == mini_root and s.layout.kind == "fish"
    s.dataloaders(size=16, bs=4)
    assert scans == [mini_dest] and s.layout is s.layout
    assert "layout" not in json.loads(s.save(tmp_path / "s.json").read_text())


def test_a_notebook_with_the_file_does_not_decide_again(mini_dest, tmp_path, monkeypatch,
                                                        capsys):
    s = decide_settings(smoke=True, data=mini_dest, out=tmp_path)
    s.save(tmp_path / "settings.json")

    def decide(*args, **kwargs):
        raise AssertionError("decided again")
    monkeypatch.setattr(settings, "decide_settings", decide)
    monkeypatch.setenv(SMOKE_ENV, "0")  # the run decided smoke: the kernel's environment is moot
    read = run_settings(None, None, None, epochs=None, settings=tmp_path / "settings.json")
    assert read == s
    assert capsys.readouterr().out == s.line() + "\n"  # the same line, once
    assert s.line().startswith("mode: smoke (asked for smoke); data: ")
    mine = run_settings(epochs=None, seed=5, settings=tmp_path / "settings.json")  # 06's knob
    assert mine == replace(s, seed=5)
    with pytest.raises(ValueError, match="smoke=True and settings=.*the run decided those"):
        run_settings(True, settings=tmp_path / "settings.json")


def test_a_notebook_by_hand_decides_once(mini_dest, tmp_path, monkeypatch, capsys):
    decided = []

    def decide(*args, **kwargs):
        decided.append((args, kwargs))
        return real_decide(*args, **kwargs)
    real_decide = settings.decide_settings
    monkeypatch.setattr(settings, "decide_settings", decide)
    s = run_settings(True, mini_dest, tmp_path, epochs=1, settings=None)
    assert len(decided) == 1 and (s.mode, s.epochs, s.out) == ("smoke", 1, tmp_path)
    assert capsys.readouterr().out.count("mode: ") == 1


def test_a_damaged_settings_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no settings file at .*gradcam-tut run"):
        RunSettings.load(tmp_path / "none.json")
    bad = tmp_path / "settings.json"
    for text in ("{", '{"mode": "smoke"}', '{"mode": "smoke", "colour": 1}', "[1]"):
        bad.write_text(text)
        with pytest.raises(ValueError, match="is not a settings file written by RunSettings"):
            RunSettings.load(bad)
