"""The audit's report: one static HTML page to hand to a colleague, every image inside it.

The page is the Jinja2 template `templates/audit_report.html` (autoescaped: file names and
class names cannot inject markup); this module only prepares what it shows. Per class, its
clusters as cards: the mean map, the interventions' numbers beside their controls, the flag
and its reason in a sentence, one example of each intervention with the network's
predictions, and the images nearest the mean map beside their maps.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.learner import Learner
from jinja2 import Environment, PackageLoader
from PIL import Image
from torch import Tensor

from ..cam import normalize_maps
from ..plot import heat_cmap, image_hwc, mean_map_image
from ..receptive_field import CellCentres, place
from .interventions import REGION_LEVEL, copy_pixels, fill, map_regions, paste, probabilities

THUMB = 96  # pixels a side of a mean map; examples are 3/4 of it
CHUNK = 16  # clusters whose examples are made at a time (one decode, one forward pass)
ENV = Environment(loader=PackageLoader("gradcam_tut.tool", "templates"), autoescape=True,
                  trim_blocks=True, lstrip_blocks=True)


def _rgb(arr: np.ndarray) -> np.ndarray:
    return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)


def data_uri(img: Image.Image, fmt: str = "PNG") -> str:
    """An image as a `data:` URI, to live inside the page."""
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    mime = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _thumb(arr: np.ndarray) -> str:
    img = Image.fromarray(_rgb(arr))
    w, h = img.size
    scale = THUMB * 3 / 4 / max(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                     Image.Resampling.BILINEAR)
    return data_uri(img, "JPEG")


def example_thumbnails(learn: Learner, images, clusters, features: np.ndarray,
                       maps: np.ndarray, centres: CellCentres | None, size: tuple[int, int],
                       examples: int, bs: int) -> dict[int, tuple[str, str]]:
    """{image index: (image, image with its map) as data URIs} for the `examples` images of
    each cluster nearest its mean map: the image as the network saw it, decoded."""
    chosen = []
    for row in clusters.itertuples():
        dist = ((features[row.members] - row.mean_map) ** 2).sum(axis=(1, 2))
        chosen += list(row.members[np.argsort(dist, kind="stable")[:examples]])
    if not chosen:  # examples=0: the report shows no example images
        return {}
    dl = learn.dls.test_dl([Path(images["file"][i]) for i in chosen], bs=bs)
    cmap, thumbs, done = heat_cmap(), {}, 0
    for (xb,) in dl:
        heat = normalize_maps(place(torch.from_numpy(maps[chosen[done:done + len(xb)]]),
                                    size, centres))  # (b, H, W)
        for image, h in zip(dl.decode((xb,))[0], heat):
            rgb, rgba = image_hwc(image), cmap(h.numpy())
            mixed = rgb * (1 - rgba[..., 3:]) + rgba[..., :3] * rgba[..., 3:]
            thumbs[chosen[done]] = (_thumb(rgb), _thumb(mixed))
            done += 1
    return thumbs


def _outlined(rgb: np.ndarray, region: Tensor) -> np.ndarray:
    """The image with the region's edge drawn in cyan."""
    inside = region[None, None].float()
    edge = (F.max_pool2d(inside, 3, 1, 1) - inside)[0, 0].bool().numpy()
    out = rgb.copy()
    out[edge] = (0.0, 0.9, 1.0)
    return out


def intervention_examples(learn: Learner, images, clusters, maps: np.ndarray,
                          centres: CellCentres | None, size: tuple[int, int], grow: int = 0,
                          swap=None, copies: Sequence[np.ndarray] | None = None
                          ) -> dict[int, list[tuple[np.ndarray, str]]]:
    """{cluster row: (image (H, W, 3) in 0..1, caption) pairs} for each cluster's example (its
    image nearest the mean map): the image with its region outlined, the region taken away,
    an image of another class, and that image with the region moved in; then, where one of
    its images' copies was tested (`copies`: each image's copied colours, `auditing.evidence`),
    the one whose class's probability fell most more than its control's when they were taken
    away (what the flag asks), its copies outlined, taken away, and alone moved into the same
    image of another class; then, with `swap` (`auditing.Swap`), the example with its class's
    content swapped for the other image's class's, the pixels swapped outlined. Each
    captioned with the network's prediction and its probability (the example and the image
    of another class as `images` has them, from the explain pass)."""
    if {"copy_removed_p", "copy_removed_control_p"} <= set(images):  # what decides its flag
        images = images.assign(copy_fall=images["copy_removed_control_p"]
                               - images["copy_removed_p"])
    has_copies = None if copies is None else [len(cs) > 0 for cs in copies]
    chosen = {}  # cluster row: (its example, an image of another class, its copies' image)
    for k, row in enumerate(clusters.itertuples()):
        i = int(row.example)
        others = np.flatnonzero(images["class"].to_numpy() != clusters["class"].iloc[k])
        if len(others):
            chosen[k] = (i, int(others[i % len(others)]),
                         _tested_example(images, row.members, "copy_fall", "copied",
                                         has_copies))
    examples: dict[int, list[tuple[np.ndarray, str]]] = {}
    keys = list(chosen)
    model, training = learn.model, learn.model.training
    try:
        model.eval()
        for start in range(0, len(keys), CHUNK):  # a few clusters at a time: one decode, one pass
            examples |= _examples(learn, images, {k: chosen[k] for k in keys[start:start + CHUNK]},
                                  maps, centres, size, grow, swap, copies)
    finally:
        model.train(training)
    return examples


def _examples(learn, images, chosen, maps, centres, size, grow, swap, copies):
    """`intervention_examples` for the clusters `chosen` ({cluster row: (its example, an image
    of another class, its image whose copies are shown)}), the model in eval mode."""
    vocab = list(learn.dls.vocab)
    needed = sorted({n for ns in chosen.values() for n in ns if n is not None})
    dl = learn.dls.test_dl([Path(images["file"][n]) for n in needed])
    x = dict(zip(needed, torch.cat([xb.as_subclass(Tensor) for (xb,) in dl])[:, None]))
    shows = {}  # cluster row: (panels (n, C, H, W), names, outlines {panel: region})
    for k, (i, j, c) in chosen.items():
        heat = place(torch.from_numpy(maps[i:i + 1]), size, centres)
        region = map_regions(heat, grow=grow).to(x[i].device)
        if not region.any():
            continue
        parts = [x[i], fill(x[i], region), x[j], paste(x[j], x[i], region)]
        names = ["its region", "taken away", "another class", "region moved in"]
        outlines = {0: region[0]}
        if c is not None and copies is not None:
            copy = copy_pixels(dl.decode((x[c],))[0].as_subclass(Tensor).cpu(), [copies[c]])
            outlines[len(parts)] = copy[0]
            copy = copy.to(x[c].device)
            parts += [x[c], fill(x[c], copy), paste(x[j], x[c], copy)]
            names += ["its copies", "copies taken away", "copies moved in"]
        if swap is not None and swap.holds[i].any():
            other = images["class"][j]
            changed, swapped = swap(x[i], [i], [images["class"][i]], [other])
            outlines[len(parts)] = swapped[0]
            parts.append(changed)
            names.append(f"{other}'s content")
        shows[k] = (torch.cat(parts), names, outlines)
    asked = [(k, n) for k, (parts, *_) in shows.items() for n in range(len(parts))
             if n not in (0, 2)]  # 0, 2: as explained
    if not asked:
        return {}
    probs = probabilities(learn.model, torch.cat([shows[k][0][n:n + 1] for k, n in asked]))
    said = {key: f"{vocab[int(q.argmax())]} {float(q.max()):.2f}" for key, q in zip(asked, probs)}
    examples: dict[int, list[tuple[np.ndarray, str]]] = {}
    for k, (parts, names, outlines) in shows.items():
        i, j = chosen[k][:2]
        said |= {(k, n): f"{images['predicted'][m]} {images['confidence'][m]:.2f}"
                 for n, m in ((0, i), (2, j))}
        shown = [image_hwc(t) for t in dl.decode((parts,))[0]]
        for n, region in outlines.items():
            shown[n] = _outlined(shown[n], region.cpu())
        examples[k] = [(pic, f"{name}: {said[k, n]}")
                       for n, (name, pic) in enumerate(zip(names, shown))]
    return examples


def _tested_example(images, members: np.ndarray, moved: str, size: str, has) -> int | None:
    """Of a cluster's `members`, the image whose part (`has`: per image, whether it has one)
    did most in its test (column `moved`; the largest part among equals, column `size`), or
    None when none has a tested part."""
    if has is None or moved not in images:
        return None
    tested = [m for m in members if not np.isnan(images[moved][m]) and has[m]]
    if not tested:
        return None
    return int(max(tested, key=lambda m: (images[moved][m], images[size][m])))


def _number(value: float, fmt: str = "{:.0%}") -> str:
    return "" if value is None or np.isnan(value) else fmt.format(value)


def times(ratio: float) -> str:
    """A ratio as a page says it: three figures below 100 (28.5, 1.81), whole above (391);
    "" for NaN (not measured)."""
    return "" if np.isnan(ratio) else f"{ratio:,.0f}" if ratio >= 100 else f"{ratio:.3g}"


def report_html(images, clusters, layer: str, thumbs: dict[int, tuple[str, str]],
                examples: dict[int, list[tuple[np.ndarray, str]]] | None = None,
                method: str = "gradcam", rule: dict | None = None) -> str:
    """The report page (see the module).

    Args:
        images, clusters: `Audit.images` and `Audit.clusters`.
        thumbs: from `example_thumbnails`; examples: from `intervention_examples`.
        rule: the flag's thresholds as the page states them (`auditing.RULE`).
    """
    rule = rule or {}
    figures = {k: [{"src": _thumb(pic), "caption": caption} for pic, caption in shown]
               for k, shown in (examples or {}).items()}
    sections = []
    for cls, group in clusters.groupby("class", sort=True):
        n, cards = int(group["size"].sum()), []
        for k, row in zip(group.index, group.itertuples()):
            accurate = not np.isnan(row.accuracy)
            shown = [{"file": images["file"][i], "plain": thumbs[i][0], "mixed": thumbs[i][1],
                      "title": f"{Path(images['file'][i]).name}: predicted "
                               f"{images['predicted'][i]} ({images['confidence'][i]:.2f})"}
                     for i in row.members if i in thumbs]
            cards.append({
                "cls": cls, "cluster": row.cluster, "size": row.size, "flagged": row.flagged,
                "flagged_images": int(images["flagged"].to_numpy()[row.members].sum()),
                "anchor": f"{cls}-{row.cluster}", "share": f"{row.size / n:.0%}",
                "accuracy_value": f"{row.accuracy:.4f}" if accurate else "",
                "accuracy_text": (f"accuracy {row.accuracy:.2f} ({row.labelled} labelled)"
                                  if accurate else "no labels"),
                "moved_value": _number(row.moved, "{:.4f}"),
                "why": row.why, "look_for": row.look_for,
                "mean": data_uri(mean_map_image(row.mean_map, THUMB)),
                "numbers": [("taken away: prediction changed", _number(row.removed),
                             _number(row.removed_control)),
                            ("moved: others now this class", _number(row.moved),
                             _number(row.moved_control)),
                            ("its content swapped: now the other class",
                             _number(row.swapped), _number(row.swapped_chance) + " chance"),
                            ("its content swapped: the other class, x as probable",
                             times(np.exp(row.swapped_gain)), "1: other swaps"),
                            ("its copies taken away: this class's probability",
                             _number(row.copy_removed_p, "{:.2f}"),
                             _number(row.copy_removed_control_p, "{:.2f}")),
                            ("same place (x chance)", _number(row.same_place, "{:.1f}"),
                             "1: chance")],
                "interventions": figures.get(k, []), "examples": shown})
        sections.append({"cls": cls, "n": n, "clusters": cards,
                         "n_flagged": int(group["flagged"].sum())})
    flagged = [c for s in sections for c in s["clusters"] if c["flagged"]]
    return ENV.get_template("audit_report.html").render(
        images=images, clusters=clusters, n_classes=clusters["class"].nunique(),
        sections=sections, flagged=flagged, layer=layer, method=method, thumb=THUMB,
        level=f"{REGION_LEVEL:.0%}",
        content_flag=times(np.exp(rule.get("content", np.nan))),
        copies_flag=_number(rule.get("copies", np.nan), "{:.2f}"))
