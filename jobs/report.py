"""The reducer's HTML report: ONE self-contained file a person opens in a browser.

Sections: the numbers of summary.json, the thresholds, one histogram per score
with its threshold line, a gallery of the top flagged images (original; the
autoencoder's reconstruction; the CAM heat map over the image, jet at 35%
opacity), and errors per shard. Every picture is a base64 PNG data URI: no
file beside it, nothing fetched when it opens. An image that cannot be
fetched or reconstructed says why in its place.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from detectors.columns import ANOMALY_SCORE
from jobs.fetch import Fetched, fetch_images
from jobs.storage import StorageError, StorageOptions, join, read_bytes, write_bytes

CAM_OPACITY = 0.35
DISPLAY_SIZE = 128  # px, longer side of a gallery image
FUSED = ANOMALY_SCORE.name


@dataclass(frozen=True)
class ReportInput:
    summary: Mapping[str, Any]
    thresholds: Mapping[str, Any]
    histograms: Mapping[str, tuple[np.ndarray, np.ndarray]]  # score -> (edges (b+1,), counts (b,))
    flagged: pa.Table  # the top flagged rows, in rank order
    model_uri: str | None


def write_report(inp: ReportInput, uri: str, storage_options: StorageOptions | None = None) -> None:
    write_bytes(uri, render_report(inp, storage_options).encode("utf-8"), storage_options)


def render_report(inp: ReportInput, storage_options: StorageOptions | None = None) -> str:
    s = inp.summary
    title = f"imgscan report: run {s.get('run_id') or '?'}"
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p class=meta>model {_e(s.get('model_version'))} &middot; results {_e(s.get('results'))} "
        f"&middot; {_e(s.get('created_at'))}</p>",
        _lead_section(s, inp.thresholds),
        _counts_section(s),
        _thresholds_section(inp.thresholds, s),
        _histograms_section(inp.histograms, inp.thresholds),
        _gallery_section(inp, storage_options),
        _errors_section(s),
        "<h2>summary.json</h2><details><summary>all numbers</summary><pre>"
        + _e(json.dumps(s, indent=2, default=str))
        + "</pre></details>",
    ]
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.meta{color:#666;font-size:13px}
.hists{display:flex;flex-wrap:wrap;gap:8px}.gallery{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px;width:440px;font-size:12px}
.card .imgs{display:flex;gap:6px}.card figure{margin:0;text-align:center}
.card figcaption{color:#666}.card img{image-rendering:pixelated;border:1px solid #eee}
.missing{width:128px;height:128px;display:flex;align-items:center;justify-content:center;
background:#fafafa;color:#a00;border:1px dashed #caa;font-size:11px;padding:4px;box-sizing:border-box}
.id{word-break:break-all;color:#444}.lead{font-size:16px}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return _e(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th class=l>{_e(h)}</th>" if i == 0 else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    trs = "".join(
        "<tr>"
        + "".join(f"<td class=l>{_fmt(c)}</td>" if i == 0 else f"<td>{_fmt(c)}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{trs}</table>"


def _lead_section(s: Mapping[str, Any], t: Mapping[str, Any]) -> str:
    """What the run found by the one score a person should read first: ``anomaly_score``."""
    th = t.get("thresholds", {}).get(FUSED)
    if th is None:
        return ""
    flagged = s.get("flagged", {}).get("per_score", {}).get(FUSED)
    m = s.get("scores", {}).get(FUSED, {})
    auc = f"; ROC AUC against known anomalies {m['roc_auc']:.3f}" if "roc_auc" in m else ""
    used = s.get("anomaly_columns") or []
    return (
        f"<p class=lead><b>{_e(flagged)}</b> of {_e(s.get('scored'))} scored images have "
        f"{FUSED} &ge; {th['value']:.3g} ({_e(th['rule'])}){_e(auc)}.</p>"
        f"<p class=meta>{FUSED} = &minus;log10 of the combined tail probability of {_e(', '.join(used))} "
        "against the bundle's held-out normal images: 3 means at most one normal image in 1,000 scores as high.</p>"
        + "".join(f"<p class=meta>{_e(n)}</p>" for n in s.get("notes") or [])
    )


def _counts_section(s: Mapping[str, Any]) -> str:
    fl = s.get("flagged", {})
    rows = [
        ["rows", s.get("rows")],
        ["scored", s.get("scored")],
        ["errors (status=error)", s.get("errors")],
        ["flagged (any rule)", fl.get("overall")],
        *[[f"flagged by {k}", v] for k, v in fl.get("per_score", {}).items()],
    ]
    out = "<h2>Counts</h2>" + _table(["", "count"], rows)
    metrics = [(k, v) for k, v in s.get("scores", {}).items() if "roc_auc" in v]
    if metrics:
        lab = s.get("labels", {})
        out += (
            f"<h2>Against known anomalies</h2><p class=meta>{_e(lab.get('anomalies'))} rows labelled "
            f"{_e(lab.get('anomaly_label'))!s} among {_e(lab.get('labelled'))} labelled rows</p>"
        )
        out += _table(
            ["score", "ROC AUC", "PR AUC", "F1", "precision", "recall", "TP", "FP", "FN", "TN"],
            [
                [
                    k,
                    v["roc_auc"],
                    v["pr_auc"],
                    *(
                        [v["f1"], v["precision"], v["recall"], *v["confusion"].values()]
                        if "confusion" in v
                        else ["not thresholded", "", "", "", "", "", ""]
                    ),
                ]
                for k, v in metrics
            ],
        )
        if "overall" in s:
            o = s["overall"]
            out += "<p>any rule: " + _e(
                f"F1 {o['f1']:.3f}, precision {o['precision']:.3f}, recall {o['recall']:.3f}, {o['confusion']}"
            )
            out += "</p>"
    return out


def _thresholds_section(t: Mapping[str, Any], s: Mapping[str, Any]) -> str:
    rows = [
        [k, v["rule"], v["direction"], v["value"], v["n"], s.get("flagged", {}).get("per_score", {}).get(k)]
        for k, v in t.get("thresholds", {}).items()
    ]
    out = "<h2>Thresholds</h2>" + _table(["score", "rule", "anomalous", "threshold", "fitted on", "flagged"], rows)
    if t.get("skipped"):
        out += "<p class=meta>not thresholded: " + _e("; ".join(f"{k}: {v}" for k, v in t["skipped"].items())) + "</p>"
    if t.get("label_audit"):
        a = t["label_audit"]
        out += (
            f"<p class=meta>label audit ({_e(a['rule'])}): {_e(a['description'])}; "
            f"classes from {_e(a['classes_from'])}</p>"
        )
    return out


def _histograms_section(hists: Mapping[str, tuple[np.ndarray, np.ndarray]], t: Mapping[str, Any]) -> str:
    if not hists:
        return "<h2>Score histograms</h2><p>No score to show.</p>"
    from jobs.schema import SCORE_DIRECTIONS

    plt = _pyplot()
    imgs = []
    for score, (edges, counts) in hists.items():
        th = t["thresholds"].get(score)
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        ax.stairs(counts, edges, fill=True, color="#4a7fb5", alpha=0.85)
        if th is not None:
            label = f"{th['rule']} = {th['value']:.4g}"
            ax.axvline(th["value"], color="#d62728", linestyle="--", linewidth=2, label=label)
            ax.legend(fontsize=8)
        if counts.max(initial=0) > 50:
            ax.set_yscale("log")
        note = "" if th is not None else ", not thresholded"
        ax.set_title(f"{score} ({SCORE_DIRECTIONS[score]} is anomalous{note})", fontsize=10)
        ax.set_ylabel("images")
        imgs.append(figure_img(fig, f"histogram of {score}"))
    return "<h2>Score histograms</h2><div class=hists>" + "".join(imgs) + "</div>"


def _gallery_section(inp: ReportInput, storage_options: StorageOptions | None) -> str:
    top = inp.flagged
    if top.num_rows == 0:
        return "<h2>Top flagged images</h2><p>No image was flagged.</p>"
    rows = top.to_pylist()
    fetched = fetch_images([r["image_id"] for r in rows], storage_options)
    ae, ae_note = _load_autoencoder(inp.model_uri, storage_options) if "recon_error" in top.schema.names else (None, "")
    cards = []
    for r in rows:
        f = fetched.get(r["image_id"]) or Fetched(r["image_id"], None, "not fetched")
        cards.append(_card(r, f, ae, ae_note, list(inp.summary.get("scores", {}))))
    return (
        f"<h2>Top flagged images ({top.num_rows})</h2>"
        "<p class=meta>original &middot; autoencoder reconstruction &middot; CAM heat map over the image "
        f"(jet, {int(CAM_OPACITY * 100)}% opacity)</p><div class=gallery>" + "".join(cards) + "</div>"
    )


def _card(r: Mapping[str, Any], f: Fetched, ae: Any, ae_note: str, shown: list[str]) -> str:
    figs = []
    if f.pixels is None:
        figs.append(_missing("original", f"image not available: {f.error}"))
    else:
        figs.append(_figure("original", _display(f.pixels)))
        if r.get("recon_error") is not None:
            if ae is None:
                figs.append(_missing("reconstruction", ae_note))
            else:
                recon = np.clip(ae.reconstruct([f.pixels])[0] * 255.0 + 0.5, 0, 255).astype(np.uint8)
                figs.append(_figure("reconstruction", _display(recon, like=f.pixels)))
        cam = r.get("cam_map")
        if cam:
            overlay, why = cam_overlay(f.pixels, np.asarray(cam, np.float32))
            figs.append(_figure("CAM", overlay) if overlay is not None else _missing("CAM", why))
    scores = ", ".join(f"{k} {r[k]:.4g}" for k in shown if isinstance(r.get(k), int | float) and r[k] is not None)
    extra = f" &middot; predicted {_e(r.get('cam_pred'))}" if r.get("cam_pred") is not None else ""
    return (
        f"<div class=card><b>#{r['rank']}</b> label {_e(r.get('label'))}{extra}<div class=imgs>{''.join(figs)}</div>"
        f"<div>fired: {_e(', '.join(r.get('rules') or []))}</div><div>{_e(scores)}</div>"
        f"<div class=id>{_e(r['image_id'])}</div></div>"
    )


def _figure(caption: str, pixels: np.ndarray) -> str:
    src = _data_uri(_png(pixels))
    return f'<figure><img alt="{_e(caption)}" src="{src}"><figcaption>{_e(caption)}</figcaption></figure>'


def _missing(caption: str, why: str) -> str:
    return f"<figure><div class=missing>{_e(why)}</div><figcaption>{_e(caption)}</figcaption></figure>"


def _display(pixels: np.ndarray, like: np.ndarray | None = None) -> np.ndarray:
    """uint8 (h, w, c) -> RGB uint8 scaled so the longer side is DISPLAY_SIZE
    (to the shape of ``like`` first: a reconstruction is shown as the original's size)."""
    ref = like if like is not None else pixels
    h, w = ref.shape[:2]
    scale = DISPLAY_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb, "RGB").resize(size, resample))


def cam_overlay(pixels: np.ndarray, cam: np.ndarray, opacity: float = CAM_OPACITY) -> tuple[np.ndarray | None, str]:
    """The CAM over the image: jet colour map at ``opacity``.

    pixels: uint8 (h, w, c); cam: float32 (k*k,) row-major square map.
    Returns (RGB uint8 at display size, "") or (None, why not).
    """
    side = math.isqrt(cam.size)
    if side * side != cam.size or side == 0:
        return None, f"cam_map of {cam.size} values is not a square map"
    if not np.isfinite(cam).all():
        return None, "cam_map has non-finite values"
    from matplotlib import colormaps

    from detectors.maps import upsample

    base = _display(pixels).astype(np.float32)
    m = upsample(cam.reshape(side, side), base.shape[0], base.shape[1])
    span = float(m.max() - m.min())
    norm = (m - m.min()) / span if span > 0 else np.zeros_like(m)
    heat = colormaps["jet"](norm)[..., :3] * 255.0
    return np.clip((1 - opacity) * base + opacity * heat + 0.5, 0, 255).astype(np.uint8), ""


def _load_autoencoder(uri: str | None, storage_options: StorageOptions | None) -> tuple[Any, str]:
    """The bundle's autoencoder (only it: the report needs nothing else), or (None, why)."""
    if not uri:
        return None, "reconstruction not available: no model URI"
    from detectors import AutoencoderDetector
    from jobs.bundle import BundleError, read_manifest

    try:
        files = read_manifest(uri, storage_options)["detectors"].get("autoencoder")
        if not files:
            return None, "reconstruction not available: the model has no autoencoder"
        blobs = {f: read_bytes(join(uri, "autoencoder", f), storage_options) for f in files}
        return AutoencoderDetector.from_files(blobs), ""
    except (BundleError, StorageError, ValueError, OSError) as e:
        return None, f"reconstruction not available: model unreadable ({e})"


def _errors_section(s: Mapping[str, Any]) -> str:
    per = s.get("errors_per_shard", {})
    out = f"<h2>Errors per shard</h2><p>{_e(s.get('errors'))} rows with status=error"
    if not per:
        return out + ".</p>"
    out += f" in {len(per)} shard(s).</p>"
    out += _table(["shard", "rows", "errors"], [[k, v["rows"], v["errors"]] for k, v in list(per.items())[:200]])
    reasons = s.get("error_reasons", {})
    if reasons:
        out += "<h3>Reasons</h3>" + _table(["reason", "rows"], [[k, v] for k, v in reasons.items()])
    return out


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_img(fig: Any, alt: str) -> str:
    """A matplotlib figure as an ``<img>`` with an embedded PNG; closes the figure."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _pyplot().close(fig)
    return f'<img alt="{_e(alt)}" src="{_data_uri(buf.getvalue())}">'


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
