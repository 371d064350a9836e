"""The nightly scan's history: every night's figures as one table and one page.

Each night writes ``ROOT/_scan/history/DATE.json`` once (``jobs.scan``); this
module gathers them into ``ROOT/_scan/history.json`` (a list, oldest first) and
``ROOT/_scan/history.html``: one self-contained page that leads with the last
night (counts, flags, which scores drifted), then draws the nights as time
series -- images and errors, the share flagged per score, the share beyond the
calibrated threshold against the share a normal night has there, and the KS
statistic against the calibration -- and ends with the table of nights, each
linking to its report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jobs.drift import DRIFT_KS, DRIFT_P
from jobs.report import _CSS, _e, _pyplot, _table, figure_img
from jobs.storage import StorageOptions, join, list_files, read_json, write_bytes, write_json


def read_entries(root: str, storage_options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """Every night's entry under ROOT/_scan/history/, oldest first."""
    infos = [i for i in list_files(join(root, "_scan", "history"), storage_options) if i["path"].endswith(".json")]
    entries = [read_json(i["name"], storage_options) for i in infos]
    return sorted(entries, key=lambda e: str(e.get("date")))


def write_history(root: str, storage_options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """(Re)write history.json and history.html from the nights' entries; returns the entries."""
    entries = read_entries(root, storage_options)
    scan = read_json(join(root, "_scan", "scan.json"), storage_options)
    write_json(join(root, "_scan", "history.json"), entries, storage_options)
    page = render_history(entries, scan, root)
    write_bytes(join(root, "_scan", "history.html"), page.encode("utf-8"), storage_options)
    return entries


def render_history(entries: Sequence[Mapping[str, Any]], scan: Mapping[str, Any], root: str) -> str:
    title = "imgscan nightly scans"
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p class=meta>{_e(root)} &middot; source {_e(scan.get('source'))} &middot; model "
        f"{_e(scan.get('model_version'))} ({_e(scan.get('model_uri'))})</p>",
    ]
    if not entries:
        body.append("<p>No night scanned yet.</p>")
    else:
        body += [_last_night(entries[-1]), _charts(entries), _nights_table(entries)]
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><style>{_CSS}.drift{{color:#b00;font-weight:bold}}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def _drifted(entry: Mapping[str, Any]) -> list[str]:
    return [s for s, d in entry.get("drift", {}).items() if d.get("drifted")]


def _last_night(e: Mapping[str, Any]) -> str:
    drifted = _drifted(e)
    verdict = (
        f"<span class=drift>drift in {_e(', '.join(drifted))}</span>"
        if drifted
        else "no score drifted from its calibration"
    )
    it = e.get("items", {})
    out = (
        f"<h2>Last night: {_e(e.get('date'))}</h2><p>{_e(it.get('total'))} new or changed item(s) "
        f"({_e(it.get('changed'))} replaced in place), {_e(e.get('images'))} images, {_e(e.get('errors'))} errors, "
        f"{_e(e.get('flagged', {}).get('overall'))} flagged; {verdict}.</p>"
    )
    rows = [
        [s, d.get("n"), d.get("share"), d.get("expected"), d.get("ratio"), d.get("ks"), d.get("ks_p"), d.get("shift")]
        for s, d in e.get("drift", {}).items()
    ]
    if rows:
        out += _table(
            ["score", "scored", "share beyond threshold", "expected share", "ratio", "KS", "KS p", "mean shift (sd)"],
            rows,
        )
        out += (
            f"<p class=meta>Against the bundle's calibration (held-out normal training images). A score drifted "
            f"when KS &ge; {DRIFT_KS:g} with p &lt; {DRIFT_P:g}; ratio = share beyond the calibrated threshold "
            "/ the share a normal night has there; mean shift is towards the anomalous side.</p>"
        )
    return out


def _series(entries: Sequence[Mapping[str, Any]], key: str) -> dict[str, list[float | None]]:
    scores = sorted({s for e in entries for s in e.get("drift", {})})
    return {s: [e.get("drift", {}).get(s, {}).get(key) for e in entries] for s in scores}


def _charts(entries: Sequence[Mapping[str, Any]]) -> str:
    plt = _pyplot()
    dates = [str(e.get("date")) for e in entries]
    x = list(range(len(dates)))
    pngs = []

    def finish(fig: Any, ax: Any, title: str) -> None:
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, dates, rotation=45, ha="right", fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        pngs.append(figure_img(fig, title))

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(x, [e.get("scored", 0) for e in entries], color="#4a7fb5", label="scored")
    ax.bar(x, [e.get("errors", 0) for e in entries], color="#d62728", label="errors")
    finish(fig, ax, "images per night")

    fig, ax = plt.subplots(figsize=(5, 3))
    per = sorted({s for e in entries for s in e.get("flagged", {}).get("per_score", {})})
    for s in per:
        ys = [
            (e.get("flagged", {}).get("per_score", {}).get(s, 0) / e["scored"]) if e.get("scored") else None
            for e in entries
        ]
        ax.plot(x, [float("nan") if y is None else y for y in ys], marker="o", label=s)
    finish(fig, ax, "share flagged, per rule")

    fig, ax = plt.subplots(figsize=(5, 3))
    for s, ys in _series(entries, "ratio").items():
        ax.plot(x, [float("nan") if y is None else max(y, 1e-2) for y in ys], marker="o", label=s)
    ax.axhline(1.0, color="#555", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    finish(fig, ax, "beyond calibrated threshold / expected")

    fig, ax = plt.subplots(figsize=(5, 3))
    for s, ys in _series(entries, "ks").items():
        ax.plot(x, [float("nan") if y is None else y for y in ys], marker="o", label=s)
    ax.axhline(DRIFT_KS, color="#d62728", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    finish(fig, ax, "KS statistic against the calibration")
    return "<h2>Nights</h2><div class=hists>" + "".join(pngs) + "</div>"


def _nights_table(entries: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for e in reversed(entries):
        it = e.get("items", {})
        date = str(e.get("date"))
        link = f'<a href="../scan_date={_e(date)}/_report/report.html">report</a>' if e.get("report") else ""
        rows.append(
            "<tr>"
            + f"<td class=l>{_e(date)}</td>"
            + "".join(
                f"<td>{_e(v)}</td>"
                for v in (
                    it.get("new"),
                    it.get("changed"),
                    e.get("images"),
                    e.get("errors"),
                    e.get("flagged", {}).get("overall"),
                )
            )
            + f"<td class=l>{_e(', '.join(_drifted(e)) or '-')}</td><td class=l>{link}</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>" for h in ("night", "new items", "replaced", "images", "errors", "flagged", "drifted", "")
    )
    return "<h2>Every night</h2><table><tr>" + head + "</tr>" + "".join(rows) + "</table>"
