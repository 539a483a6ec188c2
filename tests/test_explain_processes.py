"""`gradcam-tut explain` under torchrun (what `accelerate launch` runs): two CPU processes each
explain half the images, and the first writes the one result, the same as one process."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from gradcam_tut.tool.results import MARKER


def explain(launch: list[str], mini_root, model, out, cwd) -> subprocess.CompletedProcess:
    cmd = launch + ["-m", "gradcam_tut.tool.cli", "explain", str(mini_root), "--learner",
                    str(model), "--out", str(out), "--grids", "--bs", "4",
                    "--layers", "layer2", "layer3"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.slow
def test_two_processes_write_what_one_does(tiny_model_file, mini_root, tmp_path):
    one = explain([sys.executable], mini_root, tiny_model_file, tmp_path / "one", tmp_path)
    two = explain([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
                  mini_root, tiny_model_file, tmp_path / "two", tmp_path)
    assert one.stdout.count("54 images") == 1 and two.stdout.count("54 images") == 1
    a, b = (pd.read_csv(tmp_path / d / "explain.csv") for d in ("one", "two"))
    numbers = [c for c in a.columns if c == "confidence" or c.startswith("max_")]
    pd.testing.assert_frame_equal(a.drop(columns=numbers), b.drop(columns=numbers))
    assert np.allclose(a[numbers], b[numbers], rtol=0, atol=1e-5)
    with np.load(tmp_path / "one" / "maps.npz") as m1, \
            np.load(tmp_path / "two" / "maps.npz") as m2:
        assert m1.files == m2.files == ["files", "layer2", "layer3"]
        assert list(m1["files"]) == list(m2["files"]) == list(a["file"])
        for name in m1.files[1:]:
            assert m1[name].shape == m2[name].shape and m1[name].shape[0] == 54
            assert np.allclose(m1[name], m2[name], rtol=0, atol=1e-5), name
            assert m1[name].max() > 0  # maps, not zeros compared with zeros
    grids = [sorted(p.name for p in (tmp_path / d / "grids").iterdir()) for d in ("one", "two")]
    assert grids[0] == grids[1] and len(grids[0]) == 54  # each process drew its own share
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        MARKER, "explain.csv", "grids", "maps.npz"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
