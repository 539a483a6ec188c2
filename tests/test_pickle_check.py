"""A learner file is checked before it is unpickled: what it would import is read without
running it, and a file that would run anything a learner is not made of is refused."""

import os
import pickle
from pathlib import Path

import cloudpickle
import pytest
import torch

from gradcam_tut.tool.cli import main
from gradcam_tut.tool.pickle_check import (
    UntrustedFile,
    allowed,
    check_learner_file,
    pickle_imports,
)
from gradcam_tut.tool.train import load_fish_learner


class Call:
    """Pickles as a call of `func(*args)`: what a hostile file makes the loader run."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self):  # pickle takes only callables as the function of a call
        raise AssertionError("never called")


def payload(witness: Path) -> Call:
    return Call(os.system, f"touch {witness}")


def test_a_real_exported_learner_imports_only_what_a_learner_is_made_of(tiny_model_file):
    imports = pickle_imports(tiny_model_file)
    assert "fastai.learner.Learner" in imports
    assert [i for i in imports if not allowed(i)] == []
    check_learner_file(tiny_model_file)
    learn = load_fish_learner(tiny_model_file)  # through the checked unpickler
    assert len(learn.dls.vocab) == 9


def test_a_learner_carrying_a_payload_is_refused_and_the_payload_does_not_run(
        tiny_model_file, mini_root, tmp_path, capsys):
    learn = load_fish_learner(tiny_model_file)
    witness = tmp_path / "ran"
    learn.extra = payload(witness)
    learn.path = tmp_path
    learn.export("hostile.pkl")
    with pytest.raises(UntrustedFile, match=r"would run posix\.system.*--trust-learner"):
        load_fish_learner(tmp_path / "hostile.pkl")
    assert not witness.exists()
    image = next(mini_root.glob("Trout/Trout/*.png"))
    assert main(["grid", str(tmp_path / "hostile.pkl"), str(image),
                 "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "posix.system" in err and "--trust-learner" in err and len(err.splitlines()) == 1
    assert not witness.exists()
    load_fish_learner(tmp_path / "hostile.pkl", trust=True)  # the user said they trust it
    assert witness.exists()


@pytest.mark.parametrize("dump", [pickle.dumps, torch.save])
def test_a_pickle_that_is_not_a_learner_is_refused_before_its_payload_runs(tmp_path, dump):
    witness, bad = tmp_path / "ran", tmp_path / "bad.pkl"
    if dump is torch.save:
        torch.save({"state": payload(witness)}, bad)
    else:
        bad.write_bytes(pickle.dumps([1, payload(witness)]))
    with pytest.raises(UntrustedFile, match="posix.system"):
        load_fish_learner(bad)
    assert not witness.exists()


def test_names_it_cannot_see_statically_are_checked_while_loading(tmp_path):
    """getattr on a class that reaches a method writing files, a module fetched by name and
    code carried by value pass the import list, and are refused while loading."""
    target = tmp_path / "written"
    write = Call(Call(getattr, Path, "write_text"), target, "pwned")
    module = b"c__builtin__\ngetattr\n(cfastai\nlearner\nVos\ntR."  # fastai.learner.os
    sneaky = cloudpickle.dumps(lambda: os.system(f"touch {target}"))
    for i, data in enumerate([pickle.dumps(write, protocol=2), module, sneaky]):
        f = tmp_path / f"{i}.pkl"
        f.write_bytes(data)
        with pytest.raises(UntrustedFile):
            load_fish_learner(f)
    assert not target.exists()


def test_a_file_that_is_no_pickle_at_all_says_so(tmp_path):
    f = tmp_path / "notes.pkl"
    f.write_text("not a learner")
    with pytest.raises(UntrustedFile, match="cannot be read as a pickle"):
        load_fish_learner(f)


def test_help_says_why_the_flag_exists(capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    assert "--trust-learner" in capsys.readouterr().out
