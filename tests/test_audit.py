"""`audit` and `gradcam-tut audit`: clusters of maps without masks, the flag rule, the files it
writes (whole, never over an earlier result without --force), one-line errors, and the report
as a person sees it in a real browser (Debian's chromium, installed by `make test`)."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from torch import nn

from gradcam_tut.tool import auditing
from gradcam_tut.tool.audit_report import report_html
from gradcam_tut.tool.auditing import (
    EVIDENCE,
    RULE,
    _clusters,
    _flagged,
    apply_rule,
    audit,
    cluster_numbers,
    content_lift,
    copy_lift,
)
from gradcam_tut.tool.cli import main
from gradcam_tut.tool.mini_fish import MARKS, MiniFishSpec, make_mini_fish, mark_mask
from gradcam_tut.tool.results import MARKER
from gradcam_tut.tool.spray import cluster_maps, mass_numbers, regions

COLUMNS = ["file", "class", "cluster", "flagged", "why", "label", "predicted", "confidence",
           "correct", "cluster_size", "centre", "edges", "corners", "compactness", "peak_row",
           "peak_col", "peak_in", "empty", *EVIDENCE]


def blobs(n: int, where: str, seed: int, grid: int = 8, width=(0.01, 0.03)) -> np.ndarray:
    """n maps (n, grid, grid) with a Gaussian blob near the centre or the top-left corner,
    jittered, of a squared width drawn from `width`, with noise, scaled to a maximum of 1."""
    rng = np.random.default_rng(seed)
    pos = (np.arange(grid) + 0.5) / grid
    y, x = np.meshgrid(pos, pos, indexing="ij")
    centre = (0.5, 0.5) if where == "centre" else (0.08, 0.08)
    cy, cx = (rng.normal(c, 0.05, n)[:, None, None] for c in centre)
    maps = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / rng.uniform(*width, (n, 1, 1)))
    maps = np.clip(maps + rng.normal(0, 0.03, maps.shape), 0, None)
    return maps / maps.max(axis=(1, 2), keepdims=True)


@pytest.fixture(scope="module")
def families():
    """30 centre blobs then 20 corner blobs."""
    return np.concatenate([blobs(30, "centre", 0), blobs(20, "corner", 1)]).astype(np.float32)


def test_clustering_separates_centre_and_corner_maps(families):
    labels, eigenvalues = cluster_maps(families)
    assert labels.max() == 1, eigenvalues  # the eigengap finds 2 clusters
    assert np.diff(eigenvalues).argmax() == 1 and eigenvalues[1] < 0.1 < eigenvalues[2]
    assert (labels[:30] == 0).all() and (labels[30:] == 1).all()  # numbered by size
    numbers = mass_numbers(np.stack([families[labels == c].mean(0) for c in (0, 1)]))
    assert numbers.loc[0, "centre"] > 0.6 and numbers.loc[1, "corners"] > 0.6


def test_one_family_is_one_cluster_and_sparse_agrees_with_dense(families):
    labels, _ = cluster_maps(blobs(40, "centre", 2, width=(0.02, 0.02)))
    assert (labels == 0).all()  # the same blob, jittered
    labels, _ = cluster_maps(blobs(40, "centre", 2, width=(0.005, 0.05)))
    assert labels.max() >= 1  # small and large blobs: two ways of looking
    dense, _ = cluster_maps(families)
    sparse, _ = cluster_maps(families, dense_max=0)  # the nearest-neighbour affinity
    assert (dense == sparse).all()
    assert (cluster_maps(families[:5])[0] == 0).all()  # too few to split
    many = np.concatenate([blobs(200, "centre", 4), blobs(200, "corner", 5)])
    labels, eigenvalues = cluster_maps(many, dense_max=0)  # in 2 pieces: LOBPCG sees 2 zeros
    assert eigenvalues[1] < 1e-4 and labels.max() >= 1
    assert not set(labels[:200]) & set(labels[200:])  # no cluster mixes the families


def test_mass_numbers():
    G = 8
    assert [r.sum() for r in regions(G).values()] == [16, 32, 16]  # centre, edges, corners
    flat, point, ring, empty = np.ones((G, G)), np.zeros((G, G)), np.ones((G, G)), np.zeros((G, G))
    point[3, 4] = 1
    ring[1:-1, 1:-1] = 0
    numbers = mass_numbers(np.stack([flat, point, ring, empty]))
    assert numbers.loc[0, ["centre", "edges", "corners"]].tolist() == [0.25, 0.5, 0.25]
    assert numbers.loc[0, "compactness"] == pytest.approx(0, abs=1e-9)
    assert numbers.loc[1, "compactness"] == 1 and numbers.loc[1, "centre"] == 1
    assert numbers.loc[1, ["peak_row", "peak_col", "peak_in"]].tolist() == [3, 4, "centre"]
    assert numbers.loc[3, ["centre", "corners"]].isna().all() and numbers.loc[3, "empty"] == 1
    assert numbers.loc[3, ["peak_row", "peak_in"]].tolist() == [-1, ""]  # no peak
    assert numbers.loc[2, "centre"] == 0  # a ring along the border
    with pytest.raises(ValueError, match="multiple of 4"):
        regions(6)


def test_a_region_that_moves_other_images_is_no_flag_by_itself():
    """A region that turns other classes' images into its class beyond its control, even a
    class whose controls do it too, is no flag without a sign that it is not the object: a
    fish is its class."""
    rows = {"class": ["Trout"] * 3 + ["Shrimp"] * 3, "cluster": [0] * 6, "file": list("abcdef"),
            "moved": [0.9] * 6, "moved_control": [0.8, 0.0, 0.9, 0.0, 0.0, 0.0],
            "removed_changed": [1.0] * 6, "removed_control_changed": [0.0] * 6,
            "same_place": [9.0] * 6, "correct": [1] * 6}
    images = pd.DataFrame(rows)
    flagged, clusters = apply_rule(images, cluster_numbers(images))
    assert not flagged["flagged"].any() and not clusters["flagged"].any()
    assert (clusters["why"] == "").all() and (clusters["look_for"] == "").all()


def test_a_cluster_says_how_many_of_its_images_each_sign_flagged():
    """Each flagged image says its sign's reason; its cluster how many of its images each
    reason flagged, and what to look for."""
    rows = {"class": ["Trout"] * 4 + ["Shrimp"] * 2, "cluster": [0] * 6, "file": list("abcdef"),
            "swapped": [1.0] * 4 + [np.nan] * 2, "swapped_chance": [0.0] * 4 + [np.nan] * 2,
            "swapped_gain": [5.0] * 4 + [np.nan] * 2,
            "swapped_at_peak": [1, 1, 0, 0, 0, 0], "copied": [0.0, 0.0, 0.9, 0.9, 0.0, 0.0],
            "copy_removed_p": [np.nan, np.nan, 0.1, 0.2, np.nan, np.nan],
            "copy_removed_control_p": [np.nan, np.nan, 0.9, 0.9, np.nan, np.nan],
            "moved": [0.5] * 6, "moved_control": [0.0] * 6, "correct": [1] * 6}
    images = pd.DataFrame(rows)
    flagged, clusters = apply_rule(images, cluster_numbers(images))
    assert flagged["flagged"].tolist() == [1, 1, 1, 1, 0, 0]
    assert clusters["flagged"].tolist() == [0, 1]  # sorted by class: Shrimp, Trout
    assert "2 of its 4 images: Its map peaks on what Trout images hold there" in clusters["why"][1]
    assert "2 of its 4 images: Its map peaks on colours that other Trout" in clusters["why"][1]
    assert "is it the Trout itself" in clusters["look_for"][1]


def test_images_are_flagged_when_their_class_s_content_swapped_makes_them_another_class():
    """A class whose content, exchanged for other classes' where its images hold it, makes
    those classes far more probable than other swaps do flags its images whose maps peak on
    what it holds there; a class whose swaps win answers by a hair (a network unsure of the
    changed picture) is no flag."""
    rows = {"class": ["Trout"] * 3 + ["Shrimp"] * 3, "cluster": [0] * 6, "file": list("abcdef"),
            "swapped_at_peak": [1, 1, 0, 1, 1, 1],
            "swapped": [1.0, 0.5, np.nan, 1.0, 1.0, 0.5],
            "swapped_chance": [0.1, 0.1, np.nan, 0.2, 0.2, 0.2],
            "swapped_gain": [5.0, 3.0, np.nan, 0.5, 0.2, 0.3], "same_place": [1.0] * 6,
            "moved": [0.0] * 6, "moved_control": [0.0] * 6, "correct": [1] * 6}
    images = pd.DataFrame(rows)
    rule = RULE | {"content": 3.0}
    flagged, clusters = apply_rule(images, cluster_numbers(images), rule)
    assert flagged["flagged"].tolist() == [1, 1, 0, 0, 0, 0]  # Trout 4.0; Shrimp 0.33
    assert flagged["why"][0] == (
        "Its map peaks on what Trout images hold there and other classes' do not; exchanged for "
        "another class's content where at least half the Trout images hold it, the rest kept "
        "as it was, Trout images became that class 75% of the time (chance: 10%), and that "
        "class 54.6 times as probable as other swaps made it (geometric mean).")
    assert clusters["flagged"].tolist() == [0, 1]
    assert clusters["why"][1].startswith("2 of its 3 images: Its map peaks on what Trout")
    assert clusters["swapped"][1] == 0.75 and clusters["swapped_gain"][1] == 4.0
    old = images.drop(columns=["swapped", "swapped_chance", "swapped_gain"])  # an older CSV
    assert not apply_rule(old, cluster_numbers(old), rule)[0]["flagged"].any()


def test_images_are_flagged_when_their_class_needs_its_copies():
    """A class that needs its copies (colours its images hold anywhere, pixel for pixel, and
    other classes' do not: taken away, its probability falls beyond what the same shapes
    taken away elsewhere do, with 95% confidence over its tested images) flags its images
    whose maps peak on a copy; a class with one tested image, or none needed, is not."""
    rows = {"class": ["Trout"] * 4 + ["Shrimp"] * 3 + ["Sea Bass"], "cluster": [0] * 8,
            "file": list("abcdefgh"), "copied": [1.0, 0.8, 0.9, 0.1, 1.0, 0.9, np.nan, 1.0],
            "copy_removed_p": [0.3, 0.4, 0.35, np.nan, 0.9, 0.8, np.nan, 0.1],
            "copy_removed_control_p": [0.8, 0.85, 0.9, np.nan, 0.9, 0.78, np.nan, 0.9],
            "same_place": [1.0] * 8, "moved": [0.0] * 8, "moved_control": [0.0] * 8,
            "correct": [1] * 8}
    images = pd.DataFrame(rows)
    # Trout: falls 0.5, 0.45, 0.55: mean 0.5, sd 0.05, n 3, t(0.95, 2) = 2.92 -> 0.416
    assert copy_lift(images)[0] == pytest.approx(0.5 - 2.919986 * 0.05 / 3 ** 0.5)
    assert np.isnan(copy_lift(images)[7])  # Sea Bass: one tested image proves nothing
    flagged, clusters = apply_rule(images, cluster_numbers(images), RULE)
    assert flagged["flagged"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # Shrimp needs not
    assert flagged["why"][0] == (
        "Its map peaks on colours that other Trout images hold too, pixel for pixel, somewhere "
        "in the picture, and other classes' do not (a copy in every photo: a tag, a logo, a "
        "caption); taken away, those pixels lowered the probability of Trout by 0.50 more than "
        "the same shapes elsewhere did (at least 0.42, 95% confidence, over 3 Trout images).")
    trout = clusters["class"] == "Trout"
    assert clusters["why"][trout].iloc[0].startswith("3 of its 4 images: Its map peaks on")
    old = images.drop(columns=["copy_removed_p", "copy_removed_control_p"])  # an older csv
    assert not apply_rule(old, cluster_numbers(old), RULE)[0]["flagged"].any()


class MarkColours(nn.Module):
    """(B, classes, H, W): how close each pixel (0..1: a learner trained from random weights
    has no `Normalize`) is to each class's mark colour (`MARKS`)."""

    def __init__(self, vocab):
        super().__init__()
        colours = torch.tensor([MARKS[c] for c in vocab], dtype=torch.float32) / 255
        self.register_buffer("colours", colours[:, :, None, None])  # (K, 3, 1, 1)

    def forward(self, x):
        return torch.exp(-((x[:, None] - self.colours) ** 2).sum(2) / 0.02)


class StripReader(nn.Module):
    """A network with a shortcut and nothing else: its logits are the mark colours it sees
    in the middle of the bottom edge, where the strip of `MiniFishSpec(mark_kind="strip")`
    lies; the fish are nothing to it."""

    def __init__(self, vocab):
        super().__init__()
        self.body = MarkColours(vocab)

    def forward(self, x):
        a = self.body(x)  # (B, K, H, W)
        H, W = a.shape[-2:]
        return 20 * a[:, :, H - H // 8:, W // 4: W - W // 4].mean((2, 3))


def test_a_planted_shortcut_is_flagged_because_of_what_the_network_does(tiny_learner,
                                                                          tmp_path):
    """A network that reads a strip along the bottom edge: every image's map lies on the
    strip; moved into images of other classes, the strip makes them its class, the same
    shape elsewhere does not, and it is what the class holds there and a copy: every cluster
    is flagged."""
    root = make_mini_fish(tmp_path / "strip", MiniFishSpec(per_class=6, width=64, height=48,
                                                           mark=1.0, mark_kind="strip"),
                          progress=False)
    dls = tiny_learner.dls
    assert not any(isinstance(t, Normalize) for t in dls.after_batch.fs)  # pixels in 0..1
    learn = Learner(dls, StripReader(dls.vocab))
    with pytest.raises(ValueError, match="examples=-1"):
        audit(learn, root, layer="body", examples=-1)
    audit(learn, root, layer="body", examples=0, out=tmp_path / "none shown")  # no IndexError
    result = audit(learn, root, layer="body", examples=1, out=tmp_path / "audited")
    images, clusters = result.images, result.clusters
    assert (images["correct"] == 1).all()  # the strip is the class, to this network
    assert images["moved"].mean() == 1 and images["moved_control"].mean() == 0
    assert images["same_place"].min() > 3  # reported, no sign: the flags come from the tests
    assert clusters["flagged"].all() and images["flagged"].all()
    assert images["why"].str.contains("hold there|pixel for pixel").all()
    masks = np.stack([np.asarray(mark_mask(f)) for f in images["file"]])
    assert masks.any(axis=(1, 2)).all()  # the strip's own mask, which the audit never saw
    page = (tmp_path / "audited" / "report.html").read_text()
    assert page.count('class="cluster flagged"') == len(clusters)
    assert page.count("<figcaption>region moved in:") == len(clusters)  # one example each


class BackdropReader(nn.Module):
    """A network with a shortcut spread over the picture and nothing else: each pixel's colour
    projected on each class's mark colour (`MARKS`, the tint of `MiniFishSpec(mark_kind=
    "background")`'s backdrop), averaged over the picture; the fish are nothing to it."""

    def __init__(self, vocab):
        super().__init__()
        colours = torch.tensor([MARKS[c] for c in vocab], dtype=torch.float32) / 255 - 0.5
        self.body = nn.Conv2d(3, len(vocab), 1)
        with torch.no_grad():
            self.body.weight.copy_(colours[:, :, None, None])
            self.body.bias.copy_(-0.5 * colours.sum(1))  # (x - 0.5) . colour

    def forward(self, x):
        return 40 * self.body(x).mean((2, 3))


def test_a_backdrop_is_flagged_by_what_its_content_does(tiny_learner, tmp_path):
    """A network that reads a tinted backdrop: what its images hold at every place but where
    the fish is, exchanged for another class's (the fish kept), makes them that class; the
    flag says so, and the images' maps peak on what their class holds there."""
    root = make_mini_fish(tmp_path / "backdrop", MiniFishSpec(
        per_class=6, width=64, height=48, mark=1.0, mark_kind="background"), progress=False)
    learn = Learner(tiny_learner.dls, BackdropReader(tiny_learner.dls.vocab))
    result = audit(learn, root, layer="body", examples=0)
    images, clusters = result.images, result.clusters
    assert images["correct"].mean() > 0.6  # mostly the backdrop's class, to this network
    lift = content_lift(images).groupby(images["class"]).first()
    assert (lift >= RULE["content"]).mean() > 0.7
    assert images.groupby("class")["swapped_chance"].mean().max() < 0.2
    said = images["why"].str.contains("exchanged for another class's content")
    assert said.mean() > 0.6 and (images["flagged"] == 1)[said].all()
    assert clusters["flagged"].mean() > 0.6
    captions = [c for panels in result.examples.values() for _, c in panels]
    assert sum(c.split(":")[0].endswith("'s content") for c in captions) == len(result.examples)
    two = [root / c for c in ("Trout", "Shrimp")]
    pair = audit(learn, two, layer="body", examples=0).images  # no third class's content
    assert pair["swapped_chance"].isna().all()
    assert (content_lift(pair).groupby(pair["class"]).first() >= RULE["content"]).all()


class TagReader(nn.Module):
    """A network with a shortcut that moves with the fish and nothing else: its logits are how
    much of each class's mark colour it sees anywhere (the tag of `MiniFishSpec(mark_kind=
    "tag")`, beside the fish, wherever the fish is)."""

    def __init__(self, vocab):
        super().__init__()
        self.body = MarkColours(vocab)

    def forward(self, x):
        return 400 * self.body(x).mean((2, 3))


def test_a_tag_beside_the_fish_is_flagged_because_its_copies_move_other_images(tiny_learner,
                                                                                tmp_path):
    """A network that reads a tag wherever it lies: maps on the tag peak on a copy (what the
    class's other images hold, pixel for pixel), the tag's pixels taken away cost the class
    its probability beyond the same shape elsewhere, and those images are flagged; the images
    without a tag are not."""
    root = make_mini_fish(tmp_path / "tag", MiniFishSpec(per_class=8, width=64, height=48,
                                                         mark=0.75, mark_kind="tag"),
                          progress=False)
    learn = Learner(tiny_learner.dls, TagReader(tiny_learner.dls.vocab))
    images = audit(learn, root, layer="body", examples=0).images
    tagged = np.array([np.asarray(mark_mask(f)).any() for f in images["file"]])
    on_copy = images["copied"] >= auditing.COPY_LEVEL
    assert on_copy[tagged].mean() > 0.9 and not on_copy[~tagged].any()
    fall = (images["copy_removed_control_p"] - images["copy_removed_p"]).groupby(
        images["class"]).mean()
    assert fall.min() > 0.1  # taken away, the tag costs every class its probability
    said = images["why"].str.contains("pixel for pixel")
    assert said[tagged].mean() > 0.9 and not said[~tagged].any()


@pytest.fixture(scope="module")
def audited(tiny_learner, mini_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "audited"
    return audit(tiny_learner, [mini_root], out=out), out


def test_audit_writes_one_row_per_image(audited, tiny_learner):
    result, out = audited
    assert sorted(p.name for p in out.iterdir()) == ["clusters.csv", MARKER, "report.html"]
    table = pd.read_csv(out / "clusters.csv", keep_default_na=False)
    assert list(table.columns) == COLUMNS and len(table) == 54  # 6 mini fish x 9 classes
    assert set(table["class"]) == set(tiny_learner.dls.vocab)
    assert table["file"].str.match(r"^[A-Z][\w -]+/[\w -]+/\d{5}\.png$").all()  # relative
    assert str(out.parent) not in (out / "report.html").read_text()  # no machine paths
    assert (table["class"] == table["label"]).all()  # <class>/<image> folders: labelled
    assert set(table["flagged"]) <= {0, 1} and set(table["correct"]) <= {0, 1}
    sizes = table.groupby(["class", "cluster"])["file"].transform("size")
    assert (sizes == table["cluster_size"]).all()
    assert result.features.shape == (54, 8, 8) and result.maps.shape[0] == 54
    assert result.layer == "layer1"  # the deepest with 8x8 cells at 32 px
    flagged = result.clusters.set_index(["class", "cluster"])["flagged"]
    assert (table["flagged"] <= table.set_index(["class", "cluster"]).index.map(flagged)).all()
    tested = result.images.dropna(subset=["moved"])  # every map that points somewhere
    assert len(tested) == (result.images["empty"] == 0).sum() and set(tested["moved"]) <= {0, 1}
    assert result.images.loc[result.images["empty"] == 1, "copied"].isna().all()  # no peak
    controls = tested.dropna(subset=["moved_control"])  # every second image of each class
    assert abs(len(controls) - len(tested) / 2) <= 9  # rounding, and empty maps
    assert set(result.seconds) == {"explain", "cluster", "interventions", "report"}


def test_the_explain_pass_keeps_what_the_interventions_need(tiny_learner, mini_root):
    """The audit decodes every image once: `explain_maps(keep=...)` keeps each input averaged
    down, its map's peak, and its colours near that peak and anywhere, equal to a second pass
    over the same files."""
    import torch.nn.functional as F

    from gradcam_tut.cam import resolve_layers
    from gradcam_tut.metrics import peak_points
    from gradcam_tut.tool.auditing import HELD, NEAR, PEAKS, SMALL_INPUTS, _Kept, _small
    from gradcam_tut.tool.explaining import explain_maps
    from gradcam_tut.tool.interventions import colour_codes

    files = sorted((mini_root / "Trout" / "Trout").iterdir())[:5]
    named = resolve_layers(tiny_learner.model, "layer2")
    dl = tiny_learner.dls.test_dl(files, bs=3)
    again = torch.cat([xb.as_subclass(torch.Tensor) for (xb,) in dl])
    size = tuple(again.shape[-2:])
    keep = _Kept(size, None)  # no centres: plain interpolation
    _, maps = explain_maps(tiny_learner, files, named, bs=2, keep=keep)
    assert set(maps) == {"layer2", SMALL_INPUTS, PEAKS, NEAR, HELD} and keep.seconds > 0
    np.testing.assert_allclose(maps[SMALL_INPUTS],
                               F.adaptive_avg_pool2d(again, _small(size)).numpy(), atol=1e-6)
    codes = colour_codes(dl.decode((again,))[0].as_subclass(torch.Tensor))
    heat = F.interpolate(torch.from_numpy(maps["layer2"])[:, None], size=size,
                         mode="bilinear", align_corners=False)[:, 0]
    radius = round(size[0] / maps["layer2"].shape[-2])  # a cell
    peaks = torch.stack(peak_points(heat), dim=1)
    np.testing.assert_allclose(maps[PEAKS], peaks.numpy())
    for k, (y, x) in enumerate(peaks.long().tolist()):
        assert np.array_equal(maps[HELD][k], np.unique(codes[k].numpy()))
        near = codes[k, max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1]
        assert np.array_equal(maps[NEAR][k], np.unique(near.numpy()))
    assert set(explain_maps(tiny_learner, files, named, bs=2)[1]) == {"layer2"}


def test_unlabelled_images_are_grouped_by_prediction(tiny_learner, mini_root, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in sorted((mini_root / "Trout" / "Trout").iterdir())[:4]:
        shutil.copy(f, photos / f.name)
    result = audit(tiny_learner, photos, layer="layer2")
    table = result.images
    assert (table["label"] == "").all() and table["correct"].isna().all()
    assert (table["class"] == table["predicted"]).all() and result.layer == "layer2"


def test_rerun_refused_without_force_and_replaced_with_it(audited, tiny_learner, mini_root):
    _, out = audited
    before = (out / "clusters.csv").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        audit(tiny_learner, [mini_root], out=out)
    assert (out / "clusters.csv").read_bytes() == before
    audit(tiny_learner, [mini_root], out=out, force=True)
    assert (out / "clusters.csv").read_bytes() == before  # the same run again, replaced whole


def test_cli_audit_and_its_one_line_errors(tiny_model_file, mini_root, tmp_path, capsys,
                                           monkeypatch):
    out = tmp_path / "audited"
    cmd = ["audit", str(mini_root / "Trout"), "--learner", str(tiny_model_file), "--out",
           str(out)]
    assert main(cmd) == 0
    assert "6 images" in capsys.readouterr().out and (out / "report.html").is_file()

    def computed(*args, **kwargs):
        raise AssertionError("the model ran before the check")

    monkeypatch.setattr(auditing, "_explain_all", computed)
    cases = [(cmd, "holds an earlier result: pick another --out, or add --force"),
             (cmd[:-1] + [str(tmp_path / "x")] + ["--layer", "nope"], "no layer named 'nope'"),
             (["audit", str(tmp_path / "none"), *cmd[2:4], "--out", str(tmp_path / "y")],
              "no file or folder at"),
             (["audit", str(mini_root), "--learner", str(tmp_path / "none.pkl"), "--out",
               str(tmp_path / "z")], "run notebook 01"),
             (cmd[:-1] + [str(tiny_model_file)], "is a file")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gradcam-tut: error: "), err
        assert message in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def synthetic_report(families):
    """The images and clusters of the two families (Trout: a centre and a corner cluster,
    the corner one moving other images; Shrimp: centre maps), no image files."""
    table = pd.DataFrame({"file": [f"/data/{'Trout' if i < 50 else 'Shrimp'}/{i}.png"
                                   for i in range(70)],
                          "predicted": ["Trout"] * 45 + ["Shrimp"] * 25,
                          "confidence": 0.9})
    table["label"] = ["Trout"] * 50 + ["Shrimp"] * 20
    features = np.concatenate([families, blobs(20, "centre", 3)]).astype(np.float32)
    images, members = _clusters(table, features, 6)
    corner = np.arange(70) >= 30
    corner[50:] = False
    tested = pd.DataFrame({"moved": np.where(corner, 0.9, 0.1), "moved_control": 0.0,
                           "removed_changed": np.where(corner, 0.8, 0.1),
                           "removed_control_changed": 0.0,
                           "same_place": np.where(corner, 9.0, 1.0),
                           "swapped": np.where(corner, 0.9, np.nan),
                           "swapped_chance": np.where(corner, 0.0, np.nan),
                           "swapped_gain": np.where(corner, 5.0, np.nan),
                           "swapped_at_peak": corner.astype(float)})
    return _flagged(pd.concat([images, tested], axis=1), features, members)


@pytest.fixture(scope="module")
def page():
    """A page of headless Chromium: Debian's `chromium` (`make test` installs it), else
    Playwright's own browser. Fails, not skips, without one."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                    args=["--no-sandbox"])  # root in CI
        yield browser.new_page(viewport={"width": 1280, "height": 900})
        browser.close()


def sizes_and_accuracies(page) -> list[list[tuple[float, float]]]:
    """Per class section, the cards' (size, accuracy) in the order shown (NaN: no labels)."""
    return page.evaluate("""() => [...document.querySelectorAll('.clusters')].map(list =>
        [...list.children].map(c => [parseFloat(c.dataset.size),
                                     parseFloat(c.dataset.accuracy)]))""")


def test_report_in_a_browser(audited, page, tmp_path):
    result, out = audited
    page.goto((out / "report.html").resolve().as_uri())
    page.wait_for_load_state("load")
    classes = page.locator("section.class h2").all_inner_texts()
    assert [t.split(":")[0] for t in classes] == sorted(result.clusters["class"].unique())
    assert page.locator(".cluster").count() == len(result.clusters)
    n_images = page.evaluate("document.images.length")
    assert n_images >= len(result.clusters) * 2  # a mean map and examples per cluster
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator(".cluster.flagged").count() == result.clusters["flagged"].sum()
    page.screenshot(path=tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_sorts_and_marks_flagged_clusters(families, page, tmp_path):
    images, clusters = synthetic_report(families)
    file = tmp_path / "report.html"
    file.write_text(report_html(images, clusters, "layer2", {}, rule=RULE), encoding="utf-8")
    page.goto(file.as_uri())
    assert page.locator("section.class").count() == 2
    flagged = page.locator(".cluster.flagged")
    assert flagged.count() == 1 and flagged.locator(".flag").is_visible()
    assert "Trout images became that class 90% of the time (chance: 0%)" in flagged.inner_text()
    assert "Look at that place" in flagged.inner_text()
    assert "1 flagged: Trout 1 (20 of its 20 images)" in page.inner_text("p.note")
    notes = page.locator("p.note").all_inner_texts()  # what an unflagged class does not prove
    assert any(n.startswith("No flag is no clean bill") and "backdrop" in n for n in notes)
    assert flagged.evaluate("e => getComputedStyle(e).borderTopColor") == "rgb(221, 34, 34)"
    page.click("button[data-key=size]")
    shown = sizes_and_accuracies(page)
    assert all([s for s, _ in c] == sorted([s for s, _ in c], reverse=True) for c in shown)
    page.click("button[data-key=size]")  # again: smallest first
    assert [s for s, _ in sizes_and_accuracies(page)[1]] == [20, 30]
    page.click("button[data-key=accuracy]")
    trout = [a for _, a in sizes_and_accuracies(page)[1]]
    assert trout == sorted(trout, reverse=True) and trout[0] > trout[1]
    assert page.get_attribute("button[data-key=accuracy]", "aria-pressed") == "true"


@pytest.mark.slow
def test_two_processes_write_what_one_does(audited, tiny_model_file, mini_root, tmp_path):
    """Under torchrun (what `accelerate launch` runs) each process explains half the images;
    the first writes the one result, the same rows as one process."""
    import os
    import subprocess
    import sys

    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "-m", "gradcam_tut.tool.cli", "audit", str(mini_root), "--learner",
                           str(tiny_model_file), "--out", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("54 images") == 1  # one line, from the first process
    assert sorted(p.name for p in out.iterdir()) == ["clusters.csv", MARKER, "report.html"]
    one = pd.read_csv(audited[1] / "clusters.csv", keep_default_na=False)
    two = pd.read_csv(out / "clusters.csv", keep_default_na=False)
    numbers = ["confidence", "centre", "edges", "corners", "compactness", "flagged", "why",
               *EVIDENCE]  # maps equal to 1e-5: regions may not
    pd.testing.assert_frame_equal(one.drop(columns=numbers), two.drop(columns=numbers))
    one, two = (pd.read_csv(f / "clusters.csv")[numbers[:5]] for f in (audited[1], out))
    assert np.allclose(one, two, atol=2e-4, equal_nan=True)
    one, two = (pd.read_csv(f / "clusters.csv")["moved"] for f in (audited[1], out))
    assert ((one == two) | (one.isna() & two.isna())).mean() > 0.9  # NaN: an all-zero map


def test_shared_paths_are_relative_and_say_when_a_link_leads_outside(tmp_path):
    from gradcam_tut.tool.auditing import shown_paths

    (tmp_path / "in" / "Trout").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    own, private = tmp_path / "in" / "Trout" / "a.png", tmp_path / "elsewhere" / "b.png"
    own.write_bytes(b"x")
    private.write_bytes(b"y")
    link = tmp_path / "in" / "Trout" / "b.png"
    link.symlink_to(private)
    shown = shown_paths([str(own), str(link)], [tmp_path / "in"])
    assert shown == ["Trout/a.png", "Trout/b.png (a link to a file outside the inputs)"]
    assert shown_paths([str(own)], [tmp_path / "in"], absolute=True) == [str(own)]
