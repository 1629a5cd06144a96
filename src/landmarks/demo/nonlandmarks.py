"""Non-landmark photos: unique everyday scenes (rooms, textures, table tops, clutter, portraits,
documents) in a few shared styles, photographed with the same relighting and camera noise as landmarks."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .camera import camera_noise, output_size, relight
from .canvas import Material, hsv, shaded, smooth_noise, texture, to_image

NONLANDMARK_STYLES = ("room", "texture", "tabletop", "clutter", "portrait", "document")


def _indoor_colour(g: np.random.Generator) -> tuple[int, int, int]:
    """Warm, muted interior tones shared by all non-landmark styles."""
    return hsv(g.uniform(0.02, 0.14), g.uniform(0.08, 0.4), g.uniform(0.45, 0.92))


def _object_colour(g: np.random.Generator) -> tuple[int, int, int]:
    return hsv(g.uniform(0, 1), g.uniform(0.3, 0.85), g.uniform(0.3, 0.95))


def _nl_room(image, g):
    w, h = image.size
    draw = ImageDraw.Draw(image)
    wall, floor = _indoor_colour(g), shaded(_indoor_colour(g), 0.7)
    horizon = h * g.uniform(0.55, 0.72)
    draw.rectangle((0, 0, w, horizon), fill=wall)
    for x in np.arange(0, w, g.uniform(12, 40)):  # wallpaper stripes
        draw.line([(x, 0), (x, horizon)], fill=shaded(wall, 0.95), width=2)
    draw.rectangle((0, horizon, w, h), fill=floor)
    for k in range(-8, 9):  # floor boards
        draw.line([(w / 2 + k * w * 0.03, horizon), (w / 2 + k * w * 0.25, h)], fill=shaded(floor, 0.85), width=2)
    if g.random() < 0.6:  # window
        wx, ww = g.uniform(0.05, 0.6) * w, g.uniform(0.15, 0.3) * w
        draw.rectangle(
            (wx, h * 0.1, wx + ww, horizon * 0.75), fill=hsv(0.58, 0.2, 0.95), outline=(240, 240, 235), width=5
        )
        draw.line([(wx + ww / 2, h * 0.1), (wx + ww / 2, horizon * 0.75)], fill=(240, 240, 235), width=4)
    for _ in range(int(g.integers(1, 4))):  # pictures
        px, py = g.uniform(0, w * 0.9), g.uniform(h * 0.08, horizon * 0.5)
        pw, ph = g.uniform(0.06, 0.16) * w, g.uniform(0.06, 0.16) * h
        draw.rectangle((px, py, px + pw, py + ph), fill=_object_colour(g), outline=(60, 40, 25), width=4)
    for _ in range(int(g.integers(1, 4))):  # furniture: sofa, table, shelf
        kind = ("sofa", "table", "shelf")[g.integers(3)]
        fx, fw = g.uniform(-0.1, 0.8) * w, g.uniform(0.2, 0.45) * w
        color = _object_colour(g) if g.random() < 0.5 else shaded(_indoor_colour(g), 0.6)
        if kind == "sofa":
            fh = fw * 0.35
            draw.rounded_rectangle((fx, horizon - fh * 0.5, fx + fw, horizon + fh * 0.5), radius=fh * 0.2, fill=color)
            draw.rounded_rectangle(
                (fx, horizon - fh * 0.9, fx + fw, horizon - fh * 0.3), radius=fh * 0.2, fill=shaded(color, 0.85)
            )
        elif kind == "table":
            ty = horizon + g.uniform(0.05, 0.2) * h
            draw.rectangle((fx, ty - 10, fx + fw, ty), fill=(120, 80, 50))
            draw.rectangle((fx + 8, ty, fx + 16, ty + fw * 0.3), fill=(100, 65, 40))
            draw.rectangle((fx + fw - 16, ty, fx + fw - 8, ty + fw * 0.3), fill=(100, 65, 40))
        else:
            sh = horizon * g.uniform(0.5, 0.9)
            draw.rectangle((fx, horizon - sh, fx + fw * 0.5, horizon), fill=(110, 75, 45))
            shelf_h = sh / 4
            for row in range(4):  # books of varied height on each shelf
                bottom = horizon - sh + (row + 1) * shelf_h - 2
                x = fx + 6
                while x < fx + fw * 0.5 - 10:
                    bw = g.uniform(5, 14)
                    top = bottom - shelf_h * g.uniform(0.5, 0.9)
                    draw.rectangle((x, top, x + bw, bottom), fill=_object_colour(g))
                    x += bw + 1
    if g.random() < 0.5:  # lamp
        lx = g.uniform(0.1, 0.9) * w
        draw.line([(lx, horizon), (lx, horizon - h * 0.3)], fill=(50, 50, 50), width=4)
        draw.polygon(
            [
                (lx - 30, horizon - h * 0.3),
                (lx + 30, horizon - h * 0.3),
                (lx + 18, horizon - h * 0.4),
                (lx - 18, horizon - h * 0.4),
            ],
            fill=hsv(0.12, 0.3, 0.95),
        )


def _nl_texture(image, g):
    w, h = image.size
    kind = ("wood", "fabric", "tiles", "gravel", "brick")[g.integers(5)]
    base = _indoor_colour(g) if g.random() < 0.7 else _object_colour(g)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    b = np.array(base, np.float32)
    if kind == "wood":
        period = g.uniform(6, 20)
        rings = np.sin((yy + 25 * smooth_noise(g, w, h, 120)) / period * 2 * math.pi)
        arr = b * (0.85 + 0.15 * rings)[..., None]
    elif kind == "fabric":
        p = g.uniform(3, 8)
        weave = np.sin(xx / p * math.pi) * np.sin(yy / p * math.pi)
        arr = b * (0.9 + 0.12 * weave + 0.05 * smooth_noise(g, w, h, 40))[..., None]
    elif kind == "tiles":
        s = g.uniform(20, 70)
        grout = ((xx % s) < 3) | ((yy % s) < 3)
        arr = b * (1 + 0.06 * smooth_noise(g, w, h, s))[..., None]
        arr[grout] = shaded(base, 0.6)
    elif kind == "gravel":
        arr = np.broadcast_to(b * 0.7, (h, w, 3)).copy()
        img = to_image(arr)
        draw = ImageDraw.Draw(img)
        for _ in range(int(w * h / 150)):
            x, y, r = g.uniform(0, w), g.uniform(0, h), g.uniform(2, 9)
            draw.ellipse((x - r, y - r * 0.8, x + r, y + r * 0.8), fill=shaded(base, g.uniform(0.6, 1.3)))
        arr = np.asarray(img, np.float32)
    else:
        arr = texture(Material("brick", base, shaded(base, 1.3), g.uniform(10, 30)), w, h, g)
    image.paste(to_image(arr), (0, 0))


def _nl_tabletop(image, g):
    w, h = image.size
    draw = ImageDraw.Draw(image)
    table = _indoor_colour(g)
    draw.rectangle((0, 0, w, h), fill=table)
    for x in np.arange(0, w, g.uniform(30, 90)):
        draw.line([(x, 0), (x + g.uniform(-20, 20), h)], fill=shaded(table, 0.9), width=2)
    for _ in range(int(g.integers(1, 4))):
        r = min(w, h) * g.uniform(0.15, 0.32)
        cx, cy = g.uniform(0.15, 0.85) * w, g.uniform(0.15, 0.85) * h
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(245, 245, 240), outline=(210, 210, 205), width=3)
        for _ in range(int(g.integers(2, 7))):  # food
            fr = r * g.uniform(0.12, 0.35)
            fx, fy = cx + g.uniform(-0.5, 0.5) * r, cy + g.uniform(-0.5, 0.5) * r
            draw.ellipse((fx - fr, fy - fr * g.uniform(0.5, 1), fx + fr, fy + fr), fill=_object_colour(g))
    if g.random() < 0.7:  # cup and cutlery
        x, y = g.uniform(0.1, 0.9) * w, g.uniform(0.1, 0.9) * h
        r = min(w, h) * 0.08
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_object_colour(g), outline=(30, 30, 30), width=2)
        draw.line([(x + r * 1.5, y - r * 2), (x + r * 1.5, y + r * 2)], fill=(190, 190, 195), width=5)


def _nl_clutter(image, g):
    w, h = image.size
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, w, h), fill=_indoor_colour(g))
    for _ in range(int(g.integers(15, 45))):
        x, y = g.uniform(-0.05, 1.0) * w, g.uniform(-0.05, 1.0) * h
        s = min(w, h) * g.uniform(0.04, 0.2)
        color = _object_colour(g)
        kind = g.integers(4)
        if kind == 0:
            draw.rectangle((x, y, x + s, y + s * g.uniform(0.3, 1.5)), fill=color, outline=shaded(color, 0.6))
        elif kind == 1:
            draw.ellipse((x, y, x + s, y + s * g.uniform(0.5, 1.2)), fill=color)
        elif kind == 2:
            draw.polygon([(x + g.uniform(0, s), y + g.uniform(0, s)) for _ in range(5)], fill=color)
        else:
            draw.line(
                [(x, y), (x + g.uniform(-s, s) * 2, y + g.uniform(-s, s))], fill=color, width=int(g.integers(2, 8))
            )


def _nl_portrait(image, g):
    w, h = image.size
    back = _indoor_colour(g)
    image.paste(to_image(np.array(back, np.float32) * (1 + 0.15 * smooth_noise(g, w, h, 80))[..., None]), (0, 0))
    draw = ImageDraw.Draw(image)
    cx = w * g.uniform(0.35, 0.65)
    head = min(w, h) * g.uniform(0.22, 0.38)
    hy = h * g.uniform(0.3, 0.5)
    shirt = _object_colour(g)
    draw.ellipse((cx - head * 1.6, hy + head * 0.9, cx + head * 1.6, hy + head * 4), fill=shirt)
    skin = hsv(g.uniform(0.03, 0.1), g.uniform(0.25, 0.6), g.uniform(0.35, 0.92))
    draw.rectangle((cx - head * 0.3, hy + head * 0.5, cx + head * 0.3, hy + head * 1.1), fill=shaded(skin, 0.9))
    draw.ellipse((cx - head * 0.75, hy - head, cx + head * 0.75, hy + head), fill=skin)
    hair = hsv(g.uniform(0.02, 0.12), g.uniform(0.2, 0.7), g.uniform(0.05, 0.6))
    draw.chord((cx - head * 0.8, hy - head * 1.1, cx + head * 0.8, hy + head * 0.6), 180, 360, fill=hair)
    for side in (-1, 1):
        draw.ellipse(
            (
                cx + side * head * 0.3 - head * 0.09,
                hy - head * 0.1,
                cx + side * head * 0.3 + head * 0.09,
                hy + head * 0.05,
            ),
            fill=(35, 30, 30),
        )
    draw.arc((cx - head * 0.3, hy + head * 0.2, cx + head * 0.3, hy + head * 0.6), 20, 160, fill=(120, 50, 50), width=3)


def _nl_document(image, g):
    w, h = image.size
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, w, h), fill=shaded(_indoor_colour(g), 0.6))
    px0, py0 = w * g.uniform(0.02, 0.15), h * g.uniform(0.02, 0.15)
    px1, py1 = w * g.uniform(0.85, 0.98), h * g.uniform(0.85, 0.98)
    paper = hsv(g.uniform(0.1, 0.15), g.uniform(0.0, 0.08), g.uniform(0.9, 0.99))
    draw.rectangle((px0, py0, px1, py1), fill=paper)
    line_h = g.uniform(8, 18)
    y = py0 + line_h * 2
    ink = hsv(g.uniform(0.55, 0.7), g.uniform(0, 0.4), g.uniform(0.1, 0.3))
    while y < py1 - line_h:
        if g.random() < 0.12:  # paragraph break or a figure
            if g.random() < 0.3 and y + line_h * 8 < py1:
                bars = int(g.integers(3, 9))
                bw = (px1 - px0) * 0.6 / bars
                for k in range(bars):
                    bh = g.uniform(0.2, 1) * line_h * 6
                    draw.rectangle(
                        (px0 + line_h + k * bw, y + line_h * 6 - bh, px0 + line_h + (k + 0.7) * bw, y + line_h * 6),
                        fill=_object_colour(g),
                    )
                y += line_h * 7
            y += line_h
            continue
        x = px0 + line_h
        end = px1 - line_h * g.uniform(1, 6)
        while x < end:
            word = g.uniform(2, 9) * line_h * 0.4
            draw.rectangle((x, y, min(x + word, end), y + line_h * 0.45), fill=ink)
            x += word + line_h * 0.35
        y += line_h


NONLANDMARK_DRAWERS = {
    "room": _nl_room,
    "texture": _nl_texture,
    "tabletop": _nl_tabletop,
    "clutter": _nl_clutter,
    "portrait": _nl_portrait,
    "document": _nl_document,
}


def render_nonlandmark(style: str, g: np.random.Generator) -> Image.Image:
    """One unique everyday (non-landmark) photo of the given style."""
    image = Image.new("RGB", output_size(g))
    NONLANDMARK_DRAWERS[style](image, g)
    if g.random() < 0.25 and style != "texture":  # close-up or shot from an angle: crop and rescale
        w, h = image.size
        box = (g.uniform(0, 0.15) * w, g.uniform(0, 0.15) * h, g.uniform(0.85, 1) * w, g.uniform(0.85, 1) * h)
        image = image.resize((w, h), Image.BICUBIC, box=box)
    image = relight(image, g, strength=0.6)
    return camera_noise(image, g)
