"""The HTML page of a predict run: one self-contained file (images embedded as data URIs, no server, no
scripts) showing each photo, its answer and confidence, its nearest database images marked by landmark,
and a saliency map of the regions that made it match its nearest neighbour."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

from .common import write_text_atomic

log = logging.getLogger("landmarks.predict")

THUMBNAIL = 224  # longest side of the photos on the page
NEIGHBOUR_THUMBNAIL = 112

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; margin-bottom: 4px; }
.summary { color: #555; margin-bottom: 20px; }
.photo { display: grid; grid-template-columns: 190px 190px 250px 1fr; gap: 16px; background: #fff;
         border: 1px solid #ddd; border-radius: 8px; padding: 12px; margin-bottom: 14px; align-items: start; }
.photo.failed { grid-template-columns: 1fr; }
.photo img { border-radius: 4px; display: block; margin: 0 auto; }
.photo > figure img { height: 170px; max-width: 190px; object-fit: contain; }
figure { margin: 0; text-align: center; font-size: 12px; color: #555; }
.answer { min-width: 230px; max-width: 300px; font-size: 14px; }
.answer .id { font-weight: 600; overflow-wrap: anywhere; }
.verdict { display: inline-block; padding: 2px 8px; border-radius: 10px; font-weight: 600; margin: 6px 0; }
.landmark { background: #d8f0dd; color: #17602a; }
.non-landmark { background: #eee; color: #555; }
.error { background: #fde2e1; color: #9b1c1c; }
.neighbours { display: flex; gap: 8px; flex-wrap: wrap; }
.neighbours figure img { border: 4px solid #bbb; height: 96px; }
.neighbours figure.same img { border-color: #2e9e4f; }
.neighbours figure.other img { border-color: #d9534f; }
table.top { border-collapse: collapse; font-size: 13px; margin-top: 4px; }
table.top td { padding: 1px 8px 1px 0; }
"""


def data_uri(image, size: int) -> str:
    """The image as an inline JPEG (so the page needs no other file)."""
    image = image.copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _saliency(experiment, image, neighbour_image):
    from .saliency import embed_image, saliency_overlay

    try:
        target = embed_image(experiment.model, neighbour_image, experiment.image_size)
        return saliency_overlay(experiment.model, image, target, experiment.image_size)
    except Exception as err:
        log.warning("no saliency map: %s: %s", type(err).__name__, err)
        return None


def _figure(uri: str, caption: str, css: str = "") -> str:
    return (
        f'<figure class="{css}"><img src="{uri}" alt="{html.escape(caption)}"><figcaption>{caption}'
        "</figcaption></figure>"
    )


def _photo_card(experiment, photo, record: dict, images, saliency: bool) -> str:
    title = f'<div class="id">{html.escape(photo.id).replace("/", "/<wbr>")}</div>'
    if photo.error:
        return (
            f'<div class="photo failed"><div class="answer">{title}<span class="verdict error">error</span>'
            f"<div>{html.escape(photo.error)}</div></div></div>"
        )
    parts = [_figure(data_uri(photo.image, THUMBNAIL), "the photo"), "<div></div>"]
    neighbours = record["neighbours"]
    pictures = [images.image(n["id"]) for n in neighbours]  # each read once from its shard
    first = pictures[0] if pictures else None
    if saliency and first is not None:
        overlay = _saliency(experiment, photo.image, first)
        if overlay is not None:
            parts[1] = _figure(data_uri(overlay, THUMBNAIL), "where it matches the nearest image")
    verdict = record["verdict"]
    label = record.get("predicted_landmark_id")
    rows = "".join(
        f"<tr><td>landmark {t['landmark_id']}</td><td>{t['confidence']:.3f}</td></tr>" for t in record["top_landmarks"]
    )
    answer = (
        (
            f'<div class="answer">{title}<span class="verdict {verdict}">{verdict}</span>'
            f"<div>landmark <b>{label if label is not None else '-'}</b>, confidence "
            f"<b>{record['confidence']:.3f}</b></div>"
            f'<table class="top">{rows}</table></div>'
        )
        if label is not None
        else f'<div class="answer">{title}<span class="verdict non-landmark">no landmark found</span></div>'
    )
    figures = []
    for n, image in zip(neighbours, pictures):
        if image is None:
            continue
        same = "same" if label is not None and n["landmark_id"] == label else "other"
        inliers = f", {n['inliers']} inliers" if n["inliers"] is not None else ""
        caption = (
            f"landmark {n['landmark_id'] if n['landmark_id'] is not None else '-'}<br>cos {n['cosine']:.3f}{inliers}"
        )
        figures.append(_figure(data_uri(image, NEIGHBOUR_THUMBNAIL), caption, same))
    return (
        f'<div class="photo">{"".join(parts)}{answer}<div><div>nearest database images</div>'
        f'<div class="neighbours">{"".join(figures)}</div></div></div>'
    )


def render_page(experiment, photos, rows: list[dict], *, saliency: bool = True) -> str:
    images = experiment.images
    threshold = rows[0]["threshold"] if rows else None
    source = rows[0]["threshold_source"] if rows else ""
    answered = sum(1 for r in rows if not r["error"])
    landmarks = sum(1 for r in rows if r["verdict"] == "landmark")
    summary = (
        f"{len(rows)} photos: {answered} answered ({landmarks} landmarks, {answered - landmarks} "
        f"non-landmarks), {len(rows) - answered} failed. Experiment <code>{html.escape(str(experiment.path))}"
        f"</code>; non-landmark threshold "
        f"{'none' if threshold is None else f'{threshold:.3f}'} ({html.escape(source)}). "
        "Neighbour frames: green = the predicted landmark, red = another landmark."
    )
    cards = "".join(_photo_card(experiment, photo, record, images, saliency) for photo, record in zip(photos, rows))
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Landmark predictions</title>'
        f"<style>{STYLE}</style></head><body><h1>Landmark predictions</h1>"
        f'<div class="summary">{summary}</div>{cards}</body></html>\n'
    )


def write_page(experiment, photos, rows: list[dict], path: Path, *, saliency: bool = True) -> None:
    write_text_atomic(path, render_page(experiment, photos, rows, saliency=saliency))
