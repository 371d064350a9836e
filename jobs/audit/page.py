"""``audit.html``: one self-contained page of evidence, built from the report's helpers.

Sections: the numbers (images, out-of-fold accuracy, issues per class, the
estimated noise matrix, unreadable inputs); the suspected label issues worst
first, each with the image, the CAM heat map for the given label and for the
suggested one (from the fold model that never saw the image) and the top
probabilities; then the duplicate groups whose members carry different labels,
side by side. Every picture is a base64 PNG data URI; all text from the data is
escaped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.audit.result import AuditResult
from jobs.fetch import fetch_images
from jobs.report import _CSS, _display, _e, _figure, _missing, _table, cam_overlay
from jobs.storage import StorageOptions

#: probabilities listed per suspect
TOP_PROBS = 3


@dataclass(frozen=True)
class Suspect:
    """One suspected issue as the page shows it. pixels: uint8 (h, w, c), the original when it
    could be fetched, else the model input; cam_given / cam_suggested: float32 (h' * w',) maps."""

    rank: int
    image_id: str
    given: str
    suggested: str
    quality: float
    fold: int
    top: tuple[tuple[str, float], ...]
    pixels: np.ndarray
    cam_given: np.ndarray
    cam_suggested: np.ndarray
    note: str = ""


@dataclass(frozen=True)
class Member:
    """One image of a duplicate group. pixels: uint8 (h, w, c)."""

    image_id: str
    label: str
    similarity: float
    predicted: str
    pixels: np.ndarray
    note: str = ""


def suspects_and_groups(
    result: AuditResult,
    models: Sequence[Mapping[str, bytes]],
    take: Callable[[np.ndarray], np.ndarray],
    *,
    storage_options: StorageOptions | None = None,
    max_suspects: int,
    max_groups: int,
) -> tuple[list[Suspect], list[tuple[str, list[Member]]]]:
    """What the page shows: the first ``max_suspects`` issues (CAMs from the fold model that
    held each out) and the first ``max_groups`` conflicting duplicate groups (kind, members).

    models: each fold's model files, by fold; take: positions int64 (m,) -> model inputs
    uint8 (m, s, s, c) (``ImageBlocks.take``): only the images shown are read.
    """
    from detectors.cam import CamDetector

    r = result
    top = [int(i) for i in r.found.ranked[:max_suspects]]
    shown_groups = [g for g in r.groups if g.conflicting][:max_groups]
    wanted = list(dict.fromkeys(top + [i for g in shown_groups for i in g.members]))
    inputs = dict(zip(wanted, take(np.array(wanted, np.int64)), strict=True))
    fetched = fetch_images([r.ids[i] for i in wanted], storage_options)

    def picture(i: int) -> tuple[np.ndarray, str]:
        f = fetched.get(r.ids[i])
        if f is not None and f.pixels is not None:
            return f.pixels, ""
        why = f.error if f is not None else "not fetched"
        return inputs[i], f"original not available ({why}); the model input is shown"

    cams: dict[int, np.ndarray] = {}  # position -> float32 (h', w', k)
    for fold in sorted({int(r.fold_of[i]) for i in top}):
        members = [i for i in top if r.fold_of[i] == fold]
        det = CamDetector.from_files(models[fold])
        _, maps = det.predict_maps(np.stack([inputs[i] for i in members]))
        cams.update(zip(members, maps, strict=True))
    suspects = []
    for rank, i in enumerate(top, start=1):
        s = int(r.found.suggested[i])
        order = np.argsort(-r.probs[i])[:TOP_PROBS]
        pixels, note = picture(i)
        suspects.append(
            Suspect(
                rank=rank,
                image_id=r.ids[i],
                given=r.names[i],
                suggested=r.classes[s],
                quality=float(r.found.quality[i]),
                fold=int(r.fold_of[i]),
                top=tuple((r.classes[j], float(r.probs[i, j])) for j in order),
                pixels=pixels,
                cam_given=cams[i][:, :, r.labels[i]].ravel(),
                cam_suggested=cams[i][:, :, s].ravel(),
                note=note,
            )
        )
    cards = []
    for g in shown_groups:
        shown: list[Member] = []
        for i, sim in zip(g.members, g.similarity, strict=True):
            pixels, note = picture(i)
            shown.append(Member(r.ids[i], r.names[i], sim, r.classes[int(r.probs[i].argmax())], pixels, note))
        cards.append((g.kind, shown))
    return suspects, cards


def render_page(
    summary: Mapping[str, Any], suspects: Sequence[Suspect], groups: Sequence[tuple[str, Sequence[Member]]]
) -> str:
    title = f"imgscan label audit: {summary.get('source')}"
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p class=meta>{_e(summary.get('images'))} images, {_e(len(summary.get('classes', [])))} classes, "
        f"{_e(summary.get('folds'))} folds x {_e(summary.get('epochs'))} epochs at {_e(summary.get('image_size'))}px "
        f"&middot; out-of-fold accuracy {_e(summary.get('oof_accuracy'))} &middot; {_e(summary.get('seconds'))}s</p>",
        _numbers(summary),
        _suspects_section(summary, suspects),
        _groups_section(summary, groups),
        _unreadable_section(summary),
    ]
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><style>{_CSS}{_AUDIT_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


_AUDIT_CSS = """
.dups{display:flex;flex-wrap:wrap;gap:12px}.group{border:1px solid #d99;border-radius:6px;padding:8px;font-size:12px}
.group .imgs{display:flex;gap:10px}.group figure{margin:0;text-align:center;width:140px}
.bad{color:#a00;font-weight:bold}
"""


def _numbers(s: Mapping[str, Any]) -> str:
    d = s.get("duplicates", {})
    rows = [
        ["images audited", s.get("images")],
        ["unreadable (left out)", s.get("n_unreadable")],
        ["out-of-fold accuracy", s.get("oof_accuracy")],
        ["label issues (cleanlab)", s.get("label_issues")],
        ["duplicate groups", d.get("groups")],
        ["... with conflicting labels", d.get("conflicting_groups")],
    ]
    out = "<h2>Numbers</h2>" + _table(["", "value"], rows)
    per = s.get("issues_per_class", {})
    out += "<h2>Issues per given label</h2>" + _table(["label", "issues"], [[k, v] for k, v in per.items()])
    nm = s.get("noise_matrix", {})
    classes, values = nm.get("classes", []), nm.get("values", [])
    if values:
        out += f"<h2>Estimated noise matrix</h2><p class=meta>{_e(nm.get('description'))}</p>" + _table(
            ["given \\ true", *classes], [[c, *row] for c, row in zip(classes, values, strict=True)]
        )
    return out


def _suspects_section(s: Mapping[str, Any], suspects: Sequence[Suspect]) -> str:
    if not suspects:
        return "<h2>Suspected label issues</h2><p>cleanlab found no label issue.</p>"
    cards = []
    for x in suspects:
        figs = [_figure("image", _display(x.pixels))]
        for caption, cam in (
            (f"CAM for given {x.given}", x.cam_given),
            (f"CAM for suggested {x.suggested}", x.cam_suggested),
        ):
            overlay, why = cam_overlay(x.pixels, cam)
            figs.append(_figure(caption, overlay) if overlay is not None else _missing(caption, why))
        probs = ", ".join(f"{c}: {p:.3f}" for c, p in x.top)
        cards.append(
            f"<div class=card><b>#{x.rank}</b> given <span class=bad>{_e(x.given)}</span>, suggested "
            f"<b>{_e(x.suggested)}</b> &middot; label quality {x.quality:.4f} &middot; fold {x.fold}"
            f"<div class=imgs>{''.join(figs)}</div><div>out-of-fold probabilities: {_e(probs)}</div>"
            + (f"<div class=meta>{_e(x.note)}</div>" if x.note else "")
            + f"<div class=id>{_e(x.image_id)}</div></div>"
        )
    shown = (
        f"the first {len(suspects)} of {s.get('label_issues')}"
        if len(suspects) < (s.get("label_issues") or 0)
        else "all"
    )
    return (
        f"<h2>Suspected label issues ({_e(s.get('label_issues'))})</h2><p class=meta>worst first ({_e(shown)}; "
        "every one in label_issues.parquet); CAM heat maps from the fold model that never saw the image "
        "(jet over the image); its probabilities are the mean over the image and its shifted copies</p>"
        "<div class=gallery>" + "".join(cards) + "</div>"
    )


def _groups_section(s: Mapping[str, Any], groups: Sequence[tuple[str, Sequence[Member]]]) -> str:
    d = s.get("duplicates", {})
    head = f"<h2>Duplicates with conflicting labels ({_e(d.get('conflicting_groups'))})</h2>"
    if not groups:
        return head + f"<p>None ({_e(d.get('groups'))} duplicate groups in all, each with one label).</p>"
    cards = []
    for kind, members in groups:
        figs = "".join(
            f"<figure>{_figure(f'label {m.label}', _display(m.pixels))}<figcaption>similarity {m.similarity:.4f}"
            f"<br>predicted {_e(m.predicted)}</figcaption><div class=id>{_e(m.image_id)}</div>"
            + (f"<div class=meta>{_e(m.note)}</div>" if m.note else "")
            + "</figure>"
            for m in members
        )
        labels = ", ".join(sorted({m.label for m in members}))
        cards.append(
            f"<div class=group><b>{_e(kind)}</b> duplicates labelled {_e(labels)}<div class=imgs>{figs}</div></div>"
        )
    return head + "<div class=dups>" + "".join(cards) + "</div>"


def _unreadable_section(s: Mapping[str, Any]) -> str:
    bad = s.get("unreadable", [])
    out = f"<h2>Unreadable inputs ({len(bad)})</h2>"
    if not bad:
        return out + "<p>None.</p>"
    return (
        out
        + "<p class=meta>left out of the audit</p>"
        + _table(["image_id", "reason"], [[b.get("image_id"), b.get("reason")] for b in bad])
    )
