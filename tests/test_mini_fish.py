import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_tut.fish_layout import CLASSES, mask_file
from gradcam_tut.tool.cli import main as cli_main
from gradcam_tut.tool.layout import image_files
from gradcam_tut.tool.mini_fish import (
    HELD_OUT_KINDS,
    MARKER,
    MARKS,
    SHORTCUT_KINDS,
    MiniFishSpec,
    _render,
    main,
    make_mini_fish,
    render,
)

REPO = Path(__file__).resolve().parents[1]
SPEC = MiniFishSpec(per_class=2, width=48, height=36)


def digest(dest):
    files = sorted(p for p in dest.rglob("*.png"))
    return [(p.relative_to(dest).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
            for p in files]


def test_same_seed_identical_files(tmp_path):
    a = make_mini_fish(tmp_path / "a", SPEC, progress=False).parents[1]
    b = make_mini_fish(tmp_path / "b", SPEC, progress=False, n_workers=2).parents[1]
    assert digest(a) == digest(b) and len(digest(a)) == 2 * 9 * 2
    other = MiniFishSpec(per_class=2, width=48, height=36, seed=7)
    c = make_mini_fish(tmp_path / "c", other, progress=False).parents[1]
    assert digest(c) != digest(a)


@pytest.mark.slow
def test_two_processes_asking_at_once_get_one_whole_set(tmp_path):
    """Notebooks 01 and 06 run at once and both ask for the set: one draws, the other waits."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    dest, spec = tmp_path / "mini", MiniFishSpec(per_class=4, width=48, height=36)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        roots = list(pool.map(make_mini_fish, [dest, dest], [spec, spec], [0, 0], [False, False]))
    assert roots[0] == roots[1] and json.loads((dest / MARKER).read_text())["complete"]
    alone = make_mini_fish(tmp_path / "alone", spec, progress=False).parents[1]
    assert digest(dest) == digest(alone)  # every file whole, as one process draws it


def test_render_depends_on_class_and_index_only():
    img, mask = render("Trout", 3, SPEC)
    img2, mask2 = render("Trout", 3, SPEC)
    assert np.array_equal(np.asarray(img), np.asarray(img2))
    assert img.size == mask.size == (48, 36) and img.mode == "RGB" and mask.mode == "L"
    assert not np.array_equal(np.asarray(img), np.asarray(render("Trout", 4, SPEC)[0]))


def test_fish_is_where_the_mask_is():
    """The classes differ in the fish: their mean colour inside the mask differs by class."""
    inside = {}
    for cls in ("Red Mullet", "Sea Bass"):
        img, mask = render(cls, 0, MiniFishSpec(width=128, height=96))
        m = np.asarray(mask) > 0
        assert 0.02 < m.mean() < 0.6
        inside[cls] = np.asarray(img)[m].mean(0)
    # Red Mullet is red, Sea Bass grey: red minus blue tells them apart
    assert inside["Red Mullet"][0] - inside["Red Mullet"][2] > 50
    assert abs(inside["Sea Bass"][0] - inside["Sea Bass"][2]) < 40


def test_layout_and_marker(tmp_path):
    root = make_mini_fish(tmp_path / "m", SPEC, progress=False)
    files = image_files(root)
    assert len(files) == 18 and all(mask_file(f).is_file() for f in files)
    assert sorted(d.name for d in root.iterdir()) == sorted(CLASSES)
    assert json.loads((tmp_path / "m" / MARKER).read_text())["complete"] is True


def test_reuses_its_own_complete_set(tmp_path):
    dest = tmp_path / "m"
    make_mini_fish(dest, SPEC, progress=False)
    f = image_files(dest)[0]
    before = f.stat().st_mtime_ns
    make_mini_fish(dest, SPEC, progress=False)
    assert f.stat().st_mtime_ns == before  # nothing rewritten


def test_finishes_an_interrupted_set(tmp_path):
    dest = tmp_path / "m"
    make_mini_fish(dest, SPEC, progress=False)
    expected = digest(dest)
    marker = json.loads((dest / MARKER).read_text())
    (dest / MARKER).write_text(json.dumps({**marker, "complete": False}))
    image_files(dest)[0].unlink()
    make_mini_fish(dest, SPEC, progress=False)
    assert digest(dest) == expected


def test_refuses_a_folder_it_did_not_make(tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="not empty and was not made by make_mini_fish"):
        make_mini_fish(dest, SPEC, progress=False)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
    assert (dest / "notes.txt").read_text() == "my notes"


def test_refuses_its_own_set_with_another_spec(tmp_path):
    dest = tmp_path / "m"
    make_mini_fish(dest, SPEC, progress=False)
    before = digest(dest)
    with pytest.raises(FileExistsError, match="made with"):
        make_mini_fish(dest, MiniFishSpec(per_class=3, width=48, height=36), progress=False)
    assert digest(dest) == before


def test_replaces_its_own_set_from_an_older_generator(tmp_path):
    expected = digest(make_mini_fish(tmp_path / "new", SPEC, progress=False).parents[1])
    dest = tmp_path / "m"
    older = MiniFishSpec(per_class=3, width=48, height=36)  # another spec, an older generator
    make_mini_fish(dest, older, progress=False)
    marker = json.loads((dest / MARKER).read_text())
    (dest / MARKER).write_text(json.dumps({**marker, "generator": marker["generator"] - 1}))
    mine = dest / "Fish_Dataset" / "Fish_Dataset" / "Trout" / "notes.txt"
    mine.write_text("not the generator's")
    make_mini_fish(dest, SPEC, progress=False)
    assert digest(dest) == expected  # 2 per class now, none of the 3rd left over
    assert mine.read_text() == "not the generator's"  # what it did not write stays


def test_too_small_to_draw():
    with pytest.raises(ValueError, match="too small for a fish"):
        MiniFishSpec(width=8, height=8)


def _corners(a, side=36 // 4):  # the mark's side for a 48x36 image
    return [a[:side, :side], a[:side, -side:], a[-side:, :side], a[-side:, -side:]]


def _mark_colors(img):
    """The colours of the corners filled with one mark colour."""
    return [tuple(c[0, 0]) for c in _corners(np.asarray(img))
            if tuple(c[0, 0]) in MARKS.values() and (c == c[0, 0]).all()]


def test_a_planted_shortcut():
    """A mark changes only its own corner; it is the class's colour (a random class's when
    shuffled), and the mask never counts it as fish; unmarked images are drawn as before."""
    spec = MiniFishSpec(per_class=2, width=48, height=36, mark=1)
    shuffled, half = MiniFishSpec(**{**spec.__dict__, "shuffle_marks": True}), \
        MiniFishSpec(**{**spec.__dict__, "mark": 0.5})
    seen, kept = set(), 0
    for cls in CLASSES:
        for i in range(4):
            plain, img, mask = *render(cls, i, SPEC)[:1], *render(cls, i, spec)
            changed = (np.asarray(img) != np.asarray(plain)).any(-1)
            assert changed.mean() <= (36 // 4) ** 2 / (48 * 36)  # the mark's square only
            assert _mark_colors(img) == [MARKS[cls]]
            assert any((c == MARKS[cls]).all() and not m.any()  # the mask leaves the mark out
                       for c, m in zip(_corners(np.asarray(img)), _corners(np.asarray(mask))))
            seen |= set(_mark_colors(render(cls, i, shuffled)[0]))
            kept += np.array_equal(np.asarray(render(cls, i, half)[0]), np.asarray(plain))
    assert len(seen) > 3  # shuffled: marks of many classes
    assert 0 < kept < 36  # mark=0.5: some marked, the others exactly as before


def test_mark_mask_is_where_the_mark_is(tmp_path):
    from gradcam_tut.tool.mini_fish import mark_mask

    spec = MiniFishSpec(per_class=2, width=48, height=36, mark=0.5)
    root = make_mini_fish(tmp_path / "marked", spec, progress=False)
    marked = 0
    for cls in CLASSES:
        for f in sorted((root / cls / cls).glob("*.png")):
            where = np.asarray(mark_mask(f)).astype(bool)
            img = np.asarray(Image.open(f))
            if where.any():  # exactly the square of one mark colour
                marked += 1
                assert where.sum() == (36 // 4) ** 2
                colors = img[where]
                assert (colors == colors[0]).all() and tuple(colors[0]) in MARKS.values()
            else:
                assert _mark_colors(img) == []
    assert 0 < marked < 18
    shutil.rmtree(tmp_path / "marked")  # the same folder drawn again without marks
    root = make_mini_fish(tmp_path / "marked", replace(spec, mark=0.0), progress=False)
    assert not np.asarray(mark_mask(root / "Sea Bass" / "Sea Bass" / "00001.png")).any()
    with pytest.raises(FileNotFoundError, match="mark_mask reads the images of a set"):
        mark_mask(tmp_path / "a" / "b" / "c" / "d" / "00001.png")


@pytest.mark.parametrize("kind", SHORTCUT_KINDS + HELD_OUT_KINDS)
def test_every_kind_is_drawn_again_the_same_in_its_class_colour(kind):
    """Each kind's mark: the same pixels when drawn again (mark_mask and the truth redraw it);
    an opaque one in its class's colour and off the fish's mask; the frame all round, the dots
    apart, at places that change with the fish; the label the tag, grown; the sticker a
    noisy disc of its class's colour above or below the fish."""
    spec = MiniFishSpec(per_class=2, width=64, height=48, mark=1.0, mark_kind=kind)
    wheres = []
    for i in (0, 1):
        img, mask, (of, where) = _render("Trout", i, spec)
        again = _render("Trout", i, spec)
        assert of == "Trout" and np.array_equal(np.asarray(img), np.asarray(again[0]))
        assert np.array_equal(where, again[2][1]) and where.any()
        if kind in ("corner", "strip", "tag", "frame", "dots", "label"):  # opaque: no fish under
            assert (np.asarray(img)[where] == MARKS["Trout"]).all()
            assert not (np.asarray(mask) > 0)[where].any()
        wheres.append(where)
    if kind == "frame":
        assert wheres[0][0].all() and wheres[0][-1].all() and not wheres[0][24, 32]
    if kind == "dots":
        assert wheres[0].sum() == 5 * 3 ** 2 and not np.array_equal(*wheres)
    if kind == "label":  # a square a third of the height, where the tag's smaller one sits
        tag = _render("Trout", 0, replace(spec, mark_kind="tag"))[2][1]
        assert wheres[0].sum() == 16 ** 2 and (wheres[0] & tag).any()
    if kind == "sticker":  # a disc under or over the fish, off the fish, noisy: no two alike
        img, mask, (_, where) = _render("Shrimp", 0, spec)
        ink = np.asarray(img)[where].astype(int)
        assert not (np.asarray(mask) > 0)[where].any() and len(np.unique(ink, axis=0)) > 10
        assert (np.abs(np.median(ink, 0) - MARKS["Shrimp"]) <= 3).all()  # the class's colour
        rows, cols = np.nonzero(where)
        fish_rows = np.nonzero((np.asarray(mask) > 0).any(1))[0]
        assert rows.min() > fish_rows.max() or rows.max() < fish_rows.min()
        assert np.ptp(rows) == np.ptp(cols) == 16 - 1


def test_the_module_answers_a_user_error_in_one_line(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert cli_main(["mini-fish", str(tmp_path / "mine")]) == 2
    line = capsys.readouterr().err
    assert main([str(tmp_path / "mine")]) == 2
    same = line.replace("gradcam-tut:", "python -m gradcam_tut.tool.mini_fish:")  # the same line
    assert line.startswith("gradcam-tut: error: ") and capsys.readouterr().err == same
    done = subprocess.run([sys.executable, "-m", "gradcam_tut.tool.mini_fish",
                           str(tmp_path / "mine")],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (done.returncode, done.stdout, done.stderr) == (2, "", same)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
