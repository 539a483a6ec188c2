import pytest
import torch

from gradcam_tut.settings import SMOKE_ENV, run_settings


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(SMOKE_ENV, raising=False)


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
