"""The built-in offline demo: a deterministic synthetic landmark photo set, and the HTTP server for it.

`generate` draws `n_landmarks` procedural scenes (towers, domed halls, arches, temples, pagodas,
castles, bridges, skylines, pyramids, lighthouses, wheels, statues), each with its own structure,
palette, sky, background and ground, and photographs every scene from several views (perspective,
scale, crop, rotation, lighting, blur, noise, foreground occluders). A few landmark pairs are
deliberate look-alikes (same geometry in other colours, or same colours with other geometry) so
recognition is not trivial. Non-landmark photos are unique everyday scenes (rooms, textures, table
tops, clutter, portraits, documents) drawn in a few shared styles. Files vary in size, aspect ratio
and format (JPEG, PNG, RGBA PNG, grayscale and CMYK JPEG, EXIF-rotated JPEG). Same arguments give
byte-identical files. Besides the set, `generate` writes a few new photos no model has seen, for trying
`predict`: one more view of each of the first `new_photos` landmarks (taken in turn when there are fewer)
and half as many (rounded up) new non-landmark photos, rendered like the others from random streams of
their own, so adding them changes no byte of the set. Output in `out_dir`:

    images/<id>.jpg|png   the photos the server serves
    faults.csv            id,fault for the rows whose URL is broken on purpose
    demo.json             the arguments and counts
    new_photos/photo-NN.jpg|png
                          the unseen photos, numbered in a shuffled order (names tell nothing)
    new_photos.csv        file,landmark_id: their answers (empty landmark_id for non-landmarks)
    urls.csv              id,url,landmark_id (Google Landmarks format; empty landmark_id for
                          non-landmarks), written last: its existence means the set is complete

URL scheme of the server (`serve`, `DemoServer`, `start_server_process`):

    /images/<file>             the photo
    /fault/not_found/<file>    404
    /fault/server_error/<file> 500, every time
    /fault/slow/<file>         answers only after `slow_seconds` (past any sensible client timeout)
    /fault/truncated/<file>    200 with the full Content-Length, half the body, connection closed
    /fault/html/<file>         200 text/html (a "photo removed" page instead of the image)
    /fault/corrupt/<file>      200 image/jpeg with intact headers but damaged, unterminated scan data
    /healthz                   "ok"
"""

from __future__ import annotations

import argparse
import asyncio
import colorsys
import contextlib
import csv
import errno
import hashlib
import io
import ipaddress
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageStat

from .common import StageError, run_cli, setup_logging, write_bytes_atomic, write_json_atomic, write_text_atomic

log = logging.getLogger("landmarks.demo")

DEFAULT_BASE_URL = "http://127.0.0.1:8765"
FAULT_KINDS = ("not_found", "server_error", "slow", "truncated", "html", "corrupt")
URLS_COLUMNS = ("id", "url", "landmark_id")

# Canonical scene size: views crop and warp this picture, so it is larger than any view needs.
SCENE_W, SCENE_H = 1280, 960

# Output shapes (width:height) of the photos, as cameras and phones produce them.
ASPECTS = ((4, 3), (3, 4), (16, 9), (9, 16), (1, 1), (2, 1), (3, 2), (2, 3))
LONG_SIDE = (200, 900)

# File variants beyond a plain RGB JPEG: fraction of the good (unbroken) rows, at least one each.
VARIANT_SHARES = {
    "png": 0.06,
    "rgba_png": 0.03,
    "gray_jpeg": 0.04,
    "cmyk_jpeg": 0.03,
    "exif_3": 0.02,
    "exif_6": 0.03,
    "exif_8": 0.02,
}
VARIANTS = ("jpeg", "progressive_jpeg", *VARIANT_SHARES)
PROGRESSIVE_SHARE = 0.10

STRUCTURE_FAMILIES = (
    "tower",
    "domed_hall",
    "arch",
    "temple",
    "pagoda",
    "castle",
    "bridge",
    "skyline",
    "pyramid",
    "lighthouse",
    "wheel",
    "statue",
)
NONLANDMARK_STYLES = ("room", "texture", "tabletop", "clutter", "portrait", "document")

# Every 8th landmark is a look-alike of the one before it (a hard negative pair).
TWIN_EVERY = 8

# The random streams of the new photos (for `predict`): tags no photo of the set uses, so they are other
# views and scenes than the set's, and the set's own streams (and bytes) do not depend on them.
NEW_VIEW_TAG = "new_photo"
NEW_NONLANDMARK_TAG = "new_photo_nonlandmark"
NEW_PHOTOS_COLUMNS = ("file", "landmark_id")
_NEW_PHOTO_NAME = re.compile(r"photo-[0-9]+\.(jpg|png)")


# ---------------------------------------------------------------------------------------------
# Deterministic randomness and colours
# ---------------------------------------------------------------------------------------------


def _rng(seed: int, tag: str, *keys: int) -> np.random.Generator:
    """An independent generator per (seed, purpose, index): results never depend on task order."""
    return np.random.default_rng([seed, zlib.crc32(tag.encode()), *keys])


def _image_id(seed: int, tag: str, *keys: int) -> str:
    """16 hex characters, like Google Landmarks v2 ids."""
    text = "/".join(str(k) for k in ("landmarks-demo", seed, tag, *keys))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5)


def _shade(color, factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * factor))) for c in color[:3])


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a[:3], b[:3]))


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cell: float) -> np.ndarray:
    """Value noise in about [-1, 1]: a coarse random grid upsampled smoothly; `cell` is its period."""
    gw, gh = max(2, int(w / cell) + 2), max(2, int(h / cell) + 2)
    grid = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------
# Materials and the drawing layer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """A surface: a texture kind, its base and accent colours and its feature size in pixels."""

    kind: str  # flat, stone, brick, plaster, stripes, glass, tiles, metal
    base: tuple
    accent: tuple
    scale: float = 12.0


def _texture(material: Material, w: int, h: int, rng: np.random.Generator, grain=None) -> np.ndarray:
    """A h x w x 3 float texture, aligned to the canvas so neighbouring shapes continue it.

    `grain` (h x w, around 1) is fine noise shared by the materials of one picture.
    """
    base = np.array(material.base, np.float32)
    accent = np.array(material.accent, np.float32)
    # Coordinates as a column and a row: numpy broadcasts them, which is much cheaper than a grid.
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    if grain is None:
        grain = 1.0 + 0.05 * _smooth_noise(rng, w, h, 5.0)
    s = material.scale
    if material.kind == "brick":
        row = np.floor(yy / s)
        shifted = xx + (row % 2) * s
        col = np.floor(shifted / (2 * s))
        tint = 1.0 + 0.09 * np.sin(row * 12.9898 + col * 78.233)
        shade = tint * grain
        mortar = ((yy % s) < 2) | ((shifted % (2 * s)) < 2)
        tex = base * shade[..., None]
        tex[mortar] = accent
        return tex
    if material.kind == "stripes":
        band = (np.floor(yy / s) % 2 == 1)[..., None]
        return np.where(band, accent, base) * grain[..., None]
    if material.kind == "glass":
        pane_w, pane_h = s * 1.6, s * 2.2
        sheen = 0.75 + 0.35 * ((xx + yy * 0.6) % (9 * s) / (9 * s))
        tex = base * (sheen * grain)[..., None]
        tex[((xx % pane_w) < 2) | ((yy % pane_h) < 2)] = accent
        return tex
    if material.kind == "tiles":
        row = np.floor(yy / s)
        scallop = np.abs(np.sin((xx + (row % 2) * s) * (math.pi / (1.5 * s))))
        tex = base * ((0.85 + 0.2 * scallop * ((yy % s) / s)) * grain)[..., None]
        tex[np.broadcast_to((yy % s) < 1.5, (h, w))] = accent
        return tex
    if material.kind == "metal":
        ramp = 0.8 + 0.4 * np.abs(np.sin(xx / (3 * s)))
        return base * (ramp * grain)[..., None]
    if material.kind == "plaster":
        streak = 1.0 + 0.05 * _smooth_noise(rng, w, h, 3 * s) + 0.03 * np.sin(xx / 2.5)
        return base * (streak * grain)[..., None]
    if material.kind == "stone":
        blocks = (1.0 + 0.08 * _smooth_noise(rng, w, h, 4 * s)) * grain
        blocks = blocks * np.where((yy % (2 * s)) < 1.5, 0.8, 1.0)
        return base * blocks[..., None]
    return base * np.broadcast_to(grain, (h, w))[..., None]


class Layer:
    """An RGBA drawing layer: textured shapes, plus holes (arch openings) that show what is behind."""

    def __init__(self, size: tuple[int, int], rng: np.random.Generator):
        self.size = size
        self.rgb = Image.new("RGB", size)
        self.alpha = Image.new("L", size, 0)
        self._rng = rng
        self._textures: dict[Material, Image.Image] = {}
        self._grain: np.ndarray | None = None

    def _texture_image(self, material: Material) -> Image.Image:
        if material not in self._textures:
            w, h = self.size
            if self._grain is None:
                self._grain = 1.0 + 0.05 * _smooth_noise(self._rng, w, h, 5.0)
            self._textures[material] = _to_image(_texture(material, w, h, self._rng, self._grain))
        return self._textures[material]

    def _mask(self, shape: str, geometry, box) -> Image.Image:
        x0, y0, x1, y1 = box
        mask = Image.new("L", (x1 - x0, y1 - y0), 0)
        draw = ImageDraw.Draw(mask)
        if shape == "polygon":
            draw.polygon([(x - x0, y - y0) for x, y in geometry], fill=255)
        else:
            gx0, gx1 = sorted(geometry[0::2][:2])
            gy0, gy1 = sorted(geometry[1::2][:2])
            moved = (gx0 - x0, gy0 - y0, gx1 - x0, gy1 - y0)
            if shape == "rect":
                draw.rectangle(moved, fill=255)
            elif shape == "ellipse":
                draw.ellipse(moved, fill=255)
            elif shape == "pieslice":
                draw.pieslice(moved, geometry[4], geometry[5], fill=255)
            else:
                raise ValueError(shape)
        return mask

    def _bounds(self, shape: str, geometry):
        if shape == "polygon":
            xs = [p[0] for p in geometry]
            ys = [p[1] for p in geometry]
            box = (min(xs), min(ys), max(xs), max(ys))
        else:
            (bx0, bx1), (by0, by1) = sorted(geometry[0:4:2]), sorted(geometry[1:4:2])
            box = (bx0, by0, bx1, by1)
        w, h = self.size
        x0, y0 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
        x1, y1 = min(w, int(math.ceil(box[2])) + 1), min(h, int(math.ceil(box[3])) + 1)
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None

    def fill(self, shape: str, geometry, paint, shade: float = 1.0) -> None:
        """Paint a shape with a Material (textured) or an RGB colour (flat), darkened by `shade`."""
        box = self._bounds(shape, geometry)
        if box is None:
            return
        mask = self._mask(shape, geometry, box)
        if isinstance(paint, Material):
            patch = self._texture_image(paint).crop(box)
            if shade != 1.0:
                patch = patch.point(lambda v: min(255, int(v * shade)))
            self.rgb.paste(patch, box[:2], mask)
        else:
            self.rgb.paste(_shade(paint, shade), box, mask)
        self.alpha.paste(255, box, mask)

    def erase(self, shape: str, geometry) -> None:
        box = self._bounds(shape, geometry)
        if box is not None:
            self.alpha.paste(0, box, self._mask(shape, geometry, box))

    def rect(self, box, paint, shade: float = 1.0) -> None:
        x0, y0, x1, y1 = box
        self.fill("rect", (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), paint, shade)

    def polygon(self, points, paint, shade: float = 1.0) -> None:
        self.fill("polygon", [tuple(p) for p in points], paint, shade)

    def ellipse(self, box, paint, shade: float = 1.0) -> None:
        self.fill("ellipse", box, paint, shade)

    def dome(self, cx, base_y, w, h, paint, shade: float = 1.0) -> None:
        """The upper half of an ellipse standing on base_y."""
        self.fill("pieslice", (cx - w / 2, base_y - h, cx + w / 2, base_y + h, 180, 360), paint, shade)

    def line(self, points, color, width: int) -> None:
        ImageDraw.Draw(self.rgb).line(points, fill=tuple(color), width=width)
        ImageDraw.Draw(self.alpha).line(points, fill=255, width=width)

    def arch_hole(self, x0, y0, x1, y1) -> None:
        """An opening with a round top: the background shows through."""
        r = min((x1 - x0) / 2, y1 - y0)  # a wide, low opening gets a flatter top
        if y0 + r < y1:
            self.erase("rect", (x0, y0 + r, x1, y1))
        self.erase("ellipse", (x0, y0, x1, y0 + 2 * r))

    def composite_onto(self, image: Image.Image) -> None:
        image.paste(self.rgb, (0, 0), self.alpha)


# ---------------------------------------------------------------------------------------------
# Landmark scenes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LandmarkSpec:
    """What makes one landmark: its structure family and the seeds of its geometry, colours, setting."""

    index: int
    family: str
    shape_seed: int
    colour_seed: int
    setting_seed: int
    twin_of: int | None = None


@dataclass(frozen=True)
class Palette:
    wall: Material
    wall2: Material
    roof: Material
    trim: tuple
    window: tuple
    lit: tuple
    accent: tuple


WALL_TONES = {  # hue, saturation and value ranges of common building materials
    "sandstone": ((0.07, 0.12), (0.25, 0.5), (0.7, 0.9)),
    "marble": ((0.0, 1.0), (0.0, 0.07), (0.82, 0.96)),
    "red_brick": ((0.0, 0.04), (0.5, 0.7), (0.5, 0.72)),
    "grey_stone": ((0.55, 0.65), (0.04, 0.14), (0.45, 0.7)),
    "pastel": ((0.0, 1.0), (0.18, 0.38), (0.78, 0.95)),
    "dark": ((0.0, 1.0), (0.05, 0.3), (0.22, 0.4)),
}
ROOF_TONES = {
    "copper": ((0.42, 0.5), (0.3, 0.5), (0.5, 0.72)),
    "slate": ((0.58, 0.66), (0.15, 0.3), (0.3, 0.45)),
    "terracotta": ((0.02, 0.06), (0.6, 0.8), (0.55, 0.75)),
    "gold": ((0.11, 0.14), (0.6, 0.8), (0.8, 0.95)),
    "dark": ((0.0, 1.0), (0.1, 0.3), (0.12, 0.25)),
    "blue": ((0.55, 0.62), (0.5, 0.7), (0.45, 0.65)),
}


def _tone(g: np.random.Generator, tones: dict) -> tuple[int, int, int]:
    name = list(tones)[g.integers(len(tones))]
    (h0, h1), (s0, s1), (v0, v1) = tones[name]
    return _hsv(g.uniform(h0, h1), g.uniform(s0, s1), g.uniform(v0, v1))


def _make_palette(g: np.random.Generator) -> Palette:
    wall = _tone(g, WALL_TONES)
    wall2 = _shade(_mix(wall, _tone(g, WALL_TONES), g.uniform(0.2, 0.6)), g.uniform(0.85, 1.1))
    roof = _tone(g, ROOF_TONES)
    wall_kind = ("stone", "brick", "plaster", "stripes", "flat")[g.integers(5)]
    wall2_kind = ("stone", "brick", "plaster", "glass")[g.integers(4)]
    roof_kind = ("tiles", "metal", "flat")[g.integers(3)]
    scale = float(g.uniform(6, 14))
    return Palette(
        wall=Material(wall_kind, wall, _shade(wall, g.uniform(0.6, 0.8)), scale),
        wall2=Material(wall2_kind, wall2, _shade(wall2, 0.65), float(g.uniform(6, 14))),
        roof=Material(roof_kind, roof, _shade(roof, 0.6), float(g.uniform(5, 10))),
        trim=_shade(wall, g.uniform(1.1, 1.3)) if g.random() < 0.6 else _shade(wall, 0.6),
        window=_hsv(g.uniform(0.55, 0.65), g.uniform(0.1, 0.4), g.uniform(0.12, 0.35)),
        lit=_hsv(g.uniform(0.1, 0.15), g.uniform(0.3, 0.6), g.uniform(0.85, 1.0)),
        accent=_tone(g, ROOF_TONES),
    )


W, H = SCENE_W, SCENE_H


def _box(L: Layer, x0, y0, x1, y1, paint, depth: float = 0.0) -> None:
    """A block with an oblique side face on the right, so buildings read as solid objects."""
    L.rect((x0, y0, x1, y1), paint)
    if depth > 0:
        lift = depth * 0.45
        L.polygon([(x1, y0), (x1 + depth, y0 - lift), (x1 + depth, y1 - lift), (x1, y1)], paint, 0.68)
        L.polygon([(x0, y0), (x0 + depth, y0 - lift), (x1 + depth, y0 - lift), (x1, y0)], paint, 1.12)


def _windows(L: Layer, g, pal: Palette, x0, y0, x1, y1, rows: int, cols: int, arched: bool = False) -> None:
    if rows < 1 or cols < 1 or x1 - x0 < 4 or y1 - y0 < 4:
        return
    cw, rh = (x1 - x0) / cols, (y1 - y0) / rows
    ww, wh = cw * g.uniform(0.35, 0.6), rh * g.uniform(0.4, 0.7)
    lit = g.random((rows, cols)) < 0.12
    for r in range(rows):
        for c in range(cols):
            wx, wy = x0 + c * cw + (cw - ww) / 2, y0 + r * rh + (rh - wh) / 2
            color = pal.lit if lit[r, c] else pal.window
            L.rect((wx, wy, wx + ww, wy + wh), color)
            if arched:
                L.ellipse((wx, wy - ww / 2, wx + ww, wy + ww / 2), color)


def _columns(L: Layer, g, pal: Palette, x0, x1, top, bottom, n: int) -> None:
    """A colonnade: n columns with capitals and dark gaps between them."""
    L.rect((x0, top, x1, bottom), _shade(pal.wall.base, 0.45))
    pitch = (x1 - x0) / n
    cw = pitch * g.uniform(0.45, 0.6)
    for i in range(n):
        cx = x0 + (i + 0.5) * pitch
        L.rect((cx - cw / 2, top, cx + cw / 2, bottom), pal.wall)
        L.rect((cx - cw / 2, top + cw * 0.3, cx - cw / 2 + cw * 0.18, bottom), pal.wall, 0.8)
        L.rect((cx - cw * 0.7, top, cx + cw * 0.7, top + cw * 0.4), pal.trim)
        L.rect((cx - cw * 0.7, bottom - cw * 0.3, cx + cw * 0.7, bottom), pal.trim)


def _roof_top(L: Layer, g, pal: Palette, cx, y, w, style: str) -> float:
    """Crown a block of width w whose top is at y; returns the new top."""
    if style == "spire":
        h = w * g.uniform(1.2, 2.4)
        L.polygon([(cx - w / 2, y), (cx + w / 2, y), (cx, y - h)], pal.roof)
        L.polygon([(cx, y), (cx + w / 2, y), (cx, y - h)], pal.roof, 0.75)
        return y - h
    if style == "pyramid":
        h = w * g.uniform(0.4, 0.8)
        L.polygon([(cx - w * 0.55, y), (cx + w * 0.55, y), (cx, y - h)], pal.roof)
        return y - h
    if style == "dome":
        h = w * g.uniform(0.35, 0.6)
        L.dome(cx, y, w * 0.95, h, pal.roof)
        L.rect((cx - w * 0.04, y - h - w * 0.25, cx + w * 0.04, y - h), pal.accent)
        return y - h - w * 0.25
    if style == "onion":
        h = w * g.uniform(0.6, 0.9)
        L.ellipse((cx - w * 0.45, y - h, cx + w * 0.45, y + h * 0.1), pal.roof)
        L.polygon([(cx - w * 0.2, y - h * 0.85), (cx + w * 0.2, y - h * 0.85), (cx, y - h * 1.5)], pal.roof)
        return y - h * 1.5
    if style == "crenel":
        n = int(g.integers(3, 6))
        merlon = w / (2 * n - 1)
        for i in range(n):
            x = cx - w / 2 + 2 * i * merlon
            L.rect((x, y - merlon * 1.1, x + merlon, y), pal.wall)
        return y - merlon * 1.1
    # antenna
    L.rect((cx - w * 0.3, y - w * 0.15, cx + w * 0.3, y), pal.wall2)
    L.line([(cx, y - w * 0.15), (cx, y - w * 1.3)], pal.accent, max(2, int(w * 0.04)))
    return y - w * 1.3


def _draw_tower(L, g, pal, cx, gy):
    w = W * g.uniform(0.09, 0.15)
    h = H * g.uniform(0.3, 0.45)
    if g.random() < 0.6:  # low wings either side
        ww, wh = w * g.uniform(1.0, 2.0), h * g.uniform(0.18, 0.32)
        for side in (-1, 1):
            x0, x1 = sorted((cx + side * w * 0.45, cx + side * (w * 0.45 + ww)))
            _box(L, x0, gy - wh, x1, gy, pal.wall2, depth=ww * 0.12 if side > 0 else 0)
            _windows(L, g, pal, x0 + 6, gy - wh + 8, x1 - 6, gy - 8, int(g.integers(1, 4)), int(g.integers(3, 8)))
            L.polygon(
                [
                    (x0 - 4, gy - wh),
                    (x1 + 4, gy - wh),
                    (x1 - wh * 0.2, gy - wh * 1.25),
                    (x0 + wh * 0.2, gy - wh * 1.25),
                ],
                pal.roof,
            )
    segments = int(g.integers(1, 4))
    heights = g.dirichlet(np.ones(segments) * 3) * h
    y, seg_w = gy, w
    arched = g.random() < 0.5
    for k, sh in enumerate(sorted(heights, reverse=True)):
        _box(L, cx - seg_w / 2, y - sh, cx + seg_w / 2, y, pal.wall, depth=seg_w * 0.18)
        rows = max(1, int(sh / (seg_w * g.uniform(0.35, 0.6))))
        _windows(L, g, pal, cx - seg_w * 0.4, y - sh + 6, cx + seg_w * 0.4, y - 6, rows, int(g.integers(1, 4)), arched)
        L.rect((cx - seg_w * 0.56, y - sh, cx + seg_w * 0.56, y - sh + max(4, seg_w * 0.06)), pal.trim)
        y -= sh
        if k < segments - 1:
            seg_w *= g.uniform(0.7, 0.9)
    if g.random() < 0.5:  # clock face
        r = seg_w * 0.3
        cy = y + r * 1.6
        L.ellipse((cx - r, cy - r, cx + r, cy + r), pal.trim)
        L.line([(cx, cy), (cx + r * 0.6, cy - r * 0.3)], (30, 30, 30), 3)
        L.line([(cx, cy), (cx, cy - r * 0.8)], (30, 30, 30), 3)
    style = ("spire", "pyramid", "dome", "onion", "crenel", "antenna")[g.integers(6)]
    _roof_top(L, g, pal, cx, y, seg_w, style)


def _draw_domed_hall(L, g, pal, cx, gy):
    bw, bh = W * g.uniform(0.32, 0.48), H * g.uniform(0.12, 0.2)
    _box(L, cx - bw / 2, gy - bh, cx + bw / 2, gy, pal.wall, depth=bw * 0.05)
    _windows(
        L,
        g,
        pal,
        cx - bw * 0.48,
        gy - bh * 0.9,
        cx + bw * 0.48,
        gy - bh * 0.15,
        int(g.integers(1, 3)),
        int(g.integers(6, 14)),
        g.random() < 0.6,
    )
    if g.random() < 0.7:  # portico
        pw = bw * g.uniform(0.3, 0.5)
        _columns(L, g, pal, cx - pw / 2, cx + pw / 2, gy - bh * 1.05, gy, int(g.integers(4, 9)))
        L.polygon(
            [(cx - pw * 0.55, gy - bh * 1.05), (cx + pw * 0.55, gy - bh * 1.05), (cx, gy - bh * 1.05 - pw * 0.22)],
            pal.trim,
        )
    dw = bw * g.uniform(0.35, 0.6)
    drum_h = dw * g.uniform(0.2, 0.45)
    top = gy - bh
    _box(L, cx - dw * 0.45, top - drum_h, cx + dw * 0.45, top, pal.wall2)
    _columns(L, g, pal, cx - dw * 0.42, cx + dw * 0.42, top - drum_h * 0.85, top - drum_h * 0.1, int(g.integers(6, 12)))
    dh = dw * g.uniform(0.35, 0.6)
    L.dome(cx, top - drum_h, dw, dh, pal.roof)
    L.dome(cx + dw * 0.12, top - drum_h, dw * 0.7, dh * 0.92, pal.roof, 0.85)
    lantern_w = dw * 0.12
    L.rect(
        (cx - lantern_w / 2, top - drum_h - dh - lantern_w * 1.4, cx + lantern_w / 2, top - drum_h - dh + 2), pal.trim
    )
    _roof_top(L, g, pal, cx, top - drum_h - dh - lantern_w * 1.4, lantern_w, ("spire", "dome")[g.integers(2)])
    if g.random() < 0.5:  # minarets / flanking towers
        mw, mh = bw * 0.06, H * g.uniform(0.3, 0.45)
        for side in (-1, 1):
            mx = cx + side * bw * g.uniform(0.42, 0.55)
            L.rect((mx - mw / 2, gy - mh, mx + mw / 2, gy), pal.wall)
            L.rect((mx - mw * 0.8, gy - mh * 0.7, mx + mw * 0.8, gy - mh * 0.67), pal.trim)
            _roof_top(L, g, pal, mx, gy - mh, mw, "spire")


def _draw_arch(L, g, pal, cx, gy):
    aw, ah = W * g.uniform(0.24, 0.38), H * g.uniform(0.3, 0.42)
    _box(L, cx - aw / 2, gy - ah, cx + aw / 2, gy, pal.wall, depth=aw * 0.1)
    attic = ah * g.uniform(0.18, 0.28)
    L.rect((cx - aw * 0.52, gy - ah, cx + aw * 0.52, gy - ah + attic * 0.25), pal.trim)
    L.rect((cx - aw * 0.52, gy - ah + attic, cx + aw * 0.52, gy - ah + attic * 1.12), pal.trim)
    openings = (1, 3)[g.integers(2)]
    main_w = aw * g.uniform(0.28, 0.42)
    L.arch_hole(cx - main_w / 2, gy - ah + attic * 1.5, cx + main_w / 2, gy)
    if openings == 3:
        side_w = main_w * 0.5
        for side in (-1, 1):
            sx = cx + side * aw * 0.33
            L.arch_hole(sx - side_w / 2, gy - ah * 0.55, sx + side_w / 2, gy)
    else:
        for side in (-1, 1):  # reliefs
            sx = cx + side * aw * 0.33
            L.rect((sx - aw * 0.08, gy - ah * 0.6, sx + aw * 0.08, gy - ah * 0.3), pal.wall2)
    pilasters = int(g.integers(2, 5))
    for i in range(pilasters):
        for side in (-1, 1):
            px = cx + side * (aw * 0.5 - (i + 0.5) * aw * 0.07)
            L.rect((px - aw * 0.012, gy - ah + attic * 1.2, px + aw * 0.012, gy), pal.wall, 0.8)
    if g.random() < 0.6:  # statue group on top
        sw = aw * g.uniform(0.2, 0.4)
        L.polygon(
            [
                (cx - sw / 2, gy - ah),
                (cx + sw / 2, gy - ah),
                (cx + sw * 0.2, gy - ah - sw * 0.6),
                (cx - sw * 0.3, gy - ah - sw * 0.45),
            ],
            pal.accent,
        )


def _draw_temple(L, g, pal, cx, gy):
    tw = W * g.uniform(0.36, 0.55)
    steps = int(g.integers(2, 5))
    step_h = H * 0.015
    for i in range(steps):
        w = tw * (1 + 0.03 * (steps - i))
        L.rect((cx - w / 2, gy - (i + 1) * step_h, cx + w / 2, gy - i * step_h), pal.wall, 1.0 - 0.05 * (i % 2))
    base = gy - steps * step_h
    ch = H * g.uniform(0.16, 0.26)
    _columns(L, g, pal, cx - tw / 2, cx + tw / 2, base - ch, base, int(g.integers(5, 11)))
    ent = ch * g.uniform(0.15, 0.25)
    L.rect((cx - tw * 0.51, base - ch - ent, cx + tw * 0.51, base - ch), pal.wall2)
    L.rect((cx - tw * 0.51, base - ch - ent * 0.35, cx + tw * 0.51, base - ch - ent * 0.2), pal.trim)
    ph = tw * g.uniform(0.1, 0.2)
    L.polygon(
        [(cx - tw * 0.53, base - ch - ent), (cx + tw * 0.53, base - ch - ent), (cx, base - ch - ent - ph)],
        pal.roof if g.random() < 0.5 else pal.wall,
    )
    L.polygon(
        [(cx - tw * 0.4, base - ch - ent - 4), (cx + tw * 0.4, base - ch - ent - 4), (cx, base - ch - ent - ph * 0.8)],
        pal.wall2,
        0.8,
    )


def _draw_pagoda(L, g, pal, cx, gy):
    tiers = int(g.integers(3, 8))
    w = W * g.uniform(0.18, 0.28)
    tier_h = H * g.uniform(0.055, 0.085)
    shrink = g.uniform(0.8, 0.9)
    y = gy
    for _ in range(tiers):
        body_w = w * 0.72
        _box(L, cx - body_w / 2, y - tier_h, cx + body_w / 2, y, pal.wall, depth=body_w * 0.06)
        _windows(
            L,
            g,
            pal,
            cx - body_w * 0.4,
            y - tier_h * 0.85,
            cx + body_w * 0.4,
            y - tier_h * 0.15,
            1,
            int(g.integers(2, 5)),
        )
        roof_y = y - tier_h
        flare = w * 0.62
        L.polygon(
            [
                (cx - flare, roof_y + tier_h * 0.05),
                (cx - w * 0.4, roof_y - tier_h * 0.32),
                (cx + w * 0.4, roof_y - tier_h * 0.32),
                (cx + flare, roof_y + tier_h * 0.05),
                (cx + w * 0.45, roof_y - tier_h * 0.08),
                (cx - w * 0.45, roof_y - tier_h * 0.08),
            ],
            pal.roof,
        )
        y = roof_y - tier_h * 0.32
        w *= shrink
    L.rect((cx - 3, y - tier_h * 1.6, cx + 3, y), pal.accent)
    for k in range(3):
        ry = y - tier_h * (0.4 + 0.35 * k)
        L.ellipse((cx - w * 0.12, ry - 4, cx + w * 0.12, ry + 4), pal.accent)


def _draw_castle(L, g, pal, cx, gy):
    cw, ch = W * g.uniform(0.4, 0.6), H * g.uniform(0.14, 0.22)
    _box(L, cx - cw / 2, gy - ch, cx + cw / 2, gy, pal.wall)
    _roof_top(L, g, pal, cx, gy - ch, cw, "crenel")
    n_merlons = int(g.integers(8, 16))
    merlon = cw / (2 * n_merlons - 1)
    for i in range(n_merlons):
        x = cx - cw / 2 + 2 * i * merlon
        L.rect((x, gy - ch - merlon, x + merlon, gy - ch), pal.wall)
    L.arch_hole(cx - cw * 0.06, gy - ch * 0.6, cx + cw * 0.06, gy)
    towers = int(g.integers(2, 5))
    for i in range(towers):
        tx = cx - cw / 2 + cw * i / (towers - 1)
        tw, th = cw * g.uniform(0.09, 0.15), ch * g.uniform(1.5, 2.6)
        round_tower = g.random() < 0.5
        _box(L, tx - tw / 2, gy - th, tx + tw / 2, gy, pal.wall2 if round_tower else pal.wall, depth=tw * 0.1)
        _windows(L, g, pal, tx - tw * 0.3, gy - th * 0.9, tx + tw * 0.3, gy - th * 0.4, int(g.integers(1, 4)), 1, True)
        if round_tower:
            _roof_top(L, g, pal, tx, gy - th, tw * 1.15, "spire")
        else:
            _roof_top(L, g, pal, tx, gy - th, tw * 1.1, "crenel")
    if g.random() < 0.6:  # keep
        kw, kh = cw * 0.22, ch * g.uniform(2.0, 3.0)
        kx = cx + cw * g.uniform(-0.15, 0.15)
        _box(L, kx - kw / 2, gy - kh, kx + kw / 2, gy - ch * 0.5, pal.wall, depth=kw * 0.1)
        _windows(L, g, pal, kx - kw * 0.35, gy - kh * 0.9, kx + kw * 0.35, gy - ch * 1.1, 2, 3, True)
        _roof_top(L, g, pal, kx, gy - kh, kw, ("crenel", "pyramid", "spire")[g.integers(3)])


def _draw_bridge(L, g, pal, cx, gy):
    deck_y = gy - H * g.uniform(0.1, 0.18)
    deck_h = H * g.uniform(0.025, 0.05)
    span = W * g.uniform(0.75, 1.0)
    x0, x1 = cx - span / 2, cx + span / 2
    L.rect((x0, deck_y, x1, gy + 4), pal.wall)
    arches = int(g.integers(3, 7))
    pitch = span / arches
    for i in range(arches):
        ax = x0 + (i + 0.5) * pitch
        aw = pitch * g.uniform(0.65, 0.82)
        L.arch_hole(ax - aw / 2, deck_y + deck_h * 1.2, ax + aw / 2, gy + 6)
    L.rect((x0, deck_y - deck_h * 0.5, x1, deck_y + deck_h), pal.trim)
    style = ("towers", "suspension", "plain")[g.integers(3)]
    if style in ("towers", "suspension"):
        tw = W * g.uniform(0.04, 0.07)
        th = H * g.uniform(0.25, 0.4)
        tower_x = [cx - span * g.uniform(0.2, 0.3), cx + span * g.uniform(0.2, 0.3)]
        for tx in tower_x:
            _box(L, tx - tw / 2, deck_y - th, tx + tw / 2, deck_y, pal.wall2, depth=tw * 0.15)
            L.arch_hole(tx - tw * 0.25, deck_y - th * 0.6, tx + tw * 0.25, deck_y - th * 0.15)
            _roof_top(
                L,
                g,
                pal,
                tx,
                deck_y - th,
                tw,
                ("spire", "pyramid", "crenel")[g.integers(3)] if style == "towers" else "crenel",
            )
        if style == "suspension":
            sag = th * 0.8
            for a, b in ((x0, tower_x[0]), (tower_x[0], tower_x[1]), (tower_x[1], x1)):
                pts = []
                for t in np.linspace(0, 1, 24):
                    x = a + (b - a) * t
                    if a == x0:
                        y = deck_y - th * t**1.6
                    elif b == x1:
                        y = deck_y - th * (1 - t) ** 1.6
                    else:
                        y = deck_y - th + sag * 4 * t * (1 - t)
                    pts.append((x, y))
                L.line(pts, pal.accent, 5)
                for x, y in pts[::3]:
                    L.line([(x, y), (x, deck_y)], pal.accent, 2)


def _draw_skyline(L, g, pal, cx, gy):
    n = int(g.integers(3, 7))
    xs = np.sort(g.uniform(-0.3, 0.3, n)) * W + cx
    tallest = int(g.integers(n))
    for i, x in enumerate(xs):
        w = W * g.uniform(0.06, 0.11)
        h = H * (g.uniform(0.45, 0.62) if i == tallest else g.uniform(0.15, 0.42))
        paint = pal.wall2 if i % 2 else pal.wall
        _box(L, x - w / 2, gy - h, x + w / 2, gy, paint, depth=w * 0.15)
        if paint.kind != "glass":
            _windows(
                L, g, pal, x - w * 0.45, gy - h + 6, x + w * 0.45, gy - 4, max(2, int(h / 22)), int(g.integers(3, 7))
            )
        if i == tallest:
            _roof_top(L, g, pal, x, gy - h, w, ("spire", "antenna", "pyramid")[g.integers(3)])
        elif g.random() < 0.3:
            L.polygon([(x - w / 2, gy - h), (x + w / 2, gy - h), (x + w / 2, gy - h - w * 0.4)], pal.roof)


def _draw_pyramid(L, g, pal, cx, gy):
    if g.random() < 0.5:  # pyramids
        n = int(g.integers(1, 4))
        for i in range(n):
            pw = W * g.uniform(0.25, 0.45) * (0.75**i)
            px = cx + (i - (n - 1) / 2) * W * 0.24 + g.uniform(-20, 20)
            ph = pw * g.uniform(0.5, 0.7)
            apex = px + pw * g.uniform(-0.05, 0.08)
            L.polygon([(px - pw / 2, gy), (px + pw / 2, gy), (apex, gy - ph)], pal.wall)
            L.polygon([(apex, gy - ph), (px + pw / 2, gy), (px + pw * 0.15, gy)], pal.wall, 0.72)
            for k in range(1, 12):
                y = gy - ph * k / 12
                half = pw / 2 * (1 - k / 12)
                L.line([(apex - half, y), (apex + half, y)], _shade(pal.wall.base, 0.8), 1)
    else:  # obelisk on a pedestal
        pw, ph = W * g.uniform(0.12, 0.2), H * g.uniform(0.06, 0.1)
        _box(L, cx - pw / 2, gy - ph, cx + pw / 2, gy, pal.wall2, depth=pw * 0.1)
        L.rect((cx - pw * 0.55, gy - ph, cx + pw * 0.55, gy - ph * 0.85), pal.trim)
        ow, oh = pw * g.uniform(0.3, 0.45), H * g.uniform(0.35, 0.55)
        top = gy - ph - oh
        L.polygon(
            [(cx - ow / 2, gy - ph), (cx + ow / 2, gy - ph), (cx + ow * 0.33, top), (cx - ow * 0.33, top)], pal.wall
        )
        L.polygon([(cx, gy - ph), (cx + ow / 2, gy - ph), (cx + ow * 0.33, top), (cx, top)], pal.wall, 0.75)
        L.polygon([(cx - ow * 0.33, top), (cx + ow * 0.33, top), (cx, top - ow * 0.5)], pal.roof)


def _draw_lighthouse(L, g, pal, cx, gy):
    bw, th = W * g.uniform(0.08, 0.12), H * g.uniform(0.38, 0.5)
    tw = bw * g.uniform(0.55, 0.75)
    rock_w = W * g.uniform(0.3, 0.5)
    L.polygon(
        [
            (cx - rock_w / 2, gy + 6),
            (cx - rock_w * 0.3, gy - H * 0.04),
            (cx, gy - H * 0.05),
            (cx + rock_w * 0.35, gy - H * 0.03),
            (cx + rock_w / 2, gy + 6),
        ],
        (92, 84, 78),
    )
    base = gy - H * 0.045
    bands = int(g.integers(2, 6))
    stripes = Material("stripes", pal.wall.base, pal.roof.base, th / (2 * bands))
    L.polygon([(cx - bw / 2, base), (cx + bw / 2, base), (cx + tw / 2, base - th), (cx - tw / 2, base - th)], stripes)
    L.polygon([(cx, base), (cx + bw / 2, base), (cx + tw / 2, base - th), (cx, base - th)], stripes, 0.8)
    top = base - th
    L.rect((cx - tw * 0.75, top - 8, cx + tw * 0.75, top), pal.trim)
    lw = tw * 0.7
    L.rect((cx - lw / 2, top - lw * 0.9, cx + lw / 2, top - 8), pal.lit)
    for k in range(3):
        x = cx - lw / 2 + k * lw / 2
        L.line([(x, top - lw * 0.9), (x, top - 8)], (40, 40, 40), 2)
    L.dome(cx, top - lw * 0.9, lw * 1.1, lw * 0.55, pal.roof)
    if g.random() < 0.6:  # keeper's house
        hw, hh = bw * 1.4, H * 0.07
        hx = cx + bw * g.uniform(0.7, 1.2) * (1 if g.random() < 0.5 else -1)
        _box(L, hx - hw / 2, base - hh, hx + hw / 2, base, pal.wall2)
        L.polygon([(hx - hw * 0.6, base - hh), (hx + hw * 0.6, base - hh), (hx, base - hh * 1.6)], pal.roof)


def _draw_wheel(L, g, pal, cx, gy):
    r = H * g.uniform(0.22, 0.3)
    hub_y = gy - r - H * 0.06
    leg_spread = r * g.uniform(0.5, 0.8)
    leg_color = _shade(pal.accent, 0.8)
    L.line([(cx - leg_spread, gy), (cx, hub_y)], leg_color, 9)
    L.line([(cx + leg_spread, gy), (cx, hub_y)], leg_color, 9)
    spokes = int(g.integers(12, 28))
    ring_color = pal.trim
    L.fill("ellipse", (cx - r, hub_y - r, cx + r, hub_y + r), ring_color)
    L.erase("ellipse", (cx - r + 8, hub_y - r + 8, cx + r - 8, hub_y + r - 8))
    for k in range(spokes):
        a = 2 * math.pi * k / spokes
        L.line([(cx, hub_y), (cx + r * math.cos(a), hub_y + r * math.sin(a))], ring_color, 3)
    cabin = r * g.uniform(0.08, 0.13)
    colors = [pal.roof.base, pal.accent, pal.lit, pal.wall.base]
    for k in range(spokes):
        a = 2 * math.pi * k / spokes
        x, y = cx + r * math.cos(a), hub_y + r * math.sin(a)
        L.ellipse((x - cabin / 2, y, x + cabin / 2, y + cabin), colors[k % len(colors)])
    L.ellipse((cx - 12, hub_y - 12, cx + 12, hub_y + 12), leg_color)
    bw = W * 0.16
    _box(L, cx - bw / 2, gy - H * 0.05, cx + bw / 2, gy, pal.wall2)


def _draw_statue(L, g, pal, cx, gy):
    pw = W * g.uniform(0.1, 0.16)
    levels = int(g.integers(2, 4))
    y = gy
    for i in range(levels):
        lh = H * g.uniform(0.04, 0.09)
        w = pw * (1 - 0.15 * i)
        _box(L, cx - w / 2, y - lh, cx + w / 2, y, pal.wall2 if i % 2 else pal.wall, depth=w * 0.1)
        y -= lh
    metal = Material("metal", pal.accent, _shade(pal.accent, 0.6), 8.0)
    fh = H * g.uniform(0.25, 0.35)
    body_w = pw * 0.45
    L.polygon(
        [
            (cx - body_w / 2, y),
            (cx + body_w / 2, y),
            (cx + body_w * 0.3, y - fh * 0.75),
            (cx - body_w * 0.3, y - fh * 0.75),
        ],
        metal,
    )
    head = body_w * 0.35
    L.ellipse((cx - head / 2, y - fh * 0.75 - head, cx + head / 2, y - fh * 0.75), metal)
    side = 1 if g.random() < 0.5 else -1
    hand = (cx + side * body_w * g.uniform(0.4, 0.8), y - fh * g.uniform(0.95, 1.15))
    L.line([(cx + side * body_w * 0.25, y - fh * 0.68), hand], metal.base, max(6, int(body_w * 0.12)))
    held = ("torch", "sword", "book")[g.integers(3)]
    if held == "torch":
        L.polygon([(hand[0] - 8, hand[1]), (hand[0] + 8, hand[1]), (hand[0], hand[1] - 30)], pal.lit)
    elif held == "sword":
        L.line([hand, (hand[0], hand[1] - fh * 0.3)], (200, 200, 210), 4)
    else:
        L.rect((cx - side * body_w * 0.5, y - fh * 0.5, cx - side * body_w * 0.15, y - fh * 0.4), metal)


FAMILY_DRAWERS = {
    "tower": _draw_tower,
    "domed_hall": _draw_domed_hall,
    "arch": _draw_arch,
    "temple": _draw_temple,
    "pagoda": _draw_pagoda,
    "castle": _draw_castle,
    "bridge": _draw_bridge,
    "skyline": _draw_skyline,
    "pyramid": _draw_pyramid,
    "lighthouse": _draw_lighthouse,
    "wheel": _draw_wheel,
    "statue": _draw_statue,
}


def _sky(g: np.random.Generator) -> np.ndarray:
    kind = ("clear", "clear", "hazy", "overcast", "sunset")[g.integers(5)]
    if kind == "clear":
        top = _hsv(g.uniform(0.56, 0.62), g.uniform(0.5, 0.75), g.uniform(0.7, 0.9))
        horizon = _hsv(g.uniform(0.55, 0.6), g.uniform(0.15, 0.3), g.uniform(0.9, 1.0))
    elif kind == "hazy":
        top = _hsv(g.uniform(0.55, 0.6), g.uniform(0.25, 0.4), g.uniform(0.8, 0.9))
        horizon = _hsv(g.uniform(0.1, 0.15), g.uniform(0.05, 0.15), g.uniform(0.9, 1.0))
    elif kind == "overcast":
        v = g.uniform(0.6, 0.8)
        top, horizon = _hsv(0.6, 0.05, v), _hsv(0.6, 0.03, v + 0.12)
    else:
        top = _hsv(g.uniform(0.6, 0.7), g.uniform(0.4, 0.6), g.uniform(0.45, 0.65))
        horizon = _hsv(g.uniform(0.03, 0.1), g.uniform(0.5, 0.75), g.uniform(0.9, 1.0))
    t = (np.linspace(0, 1, H, dtype=np.float32) ** g.uniform(0.7, 1.6))[:, None, None]
    sky = np.array(top, np.float32) * (1 - t) + np.array(horizon, np.float32) * t
    sky = np.broadcast_to(sky, (H, W, 3)).copy()
    if kind != "overcast":  # clouds: soft bright blobs
        clouds = Image.new("L", (W, H), 0)
        draw = ImageDraw.Draw(clouds)
        for _ in range(int(g.integers(0, 7))):
            x, y = g.uniform(0, W), g.uniform(0, H * 0.45)
            for _ in range(int(g.integers(3, 7))):
                rx, ry = g.uniform(40, 120), g.uniform(15, 45)
                ox, oy = g.uniform(-100, 100), g.uniform(-20, 20)
                draw.ellipse((x + ox - rx, y + oy - ry, x + ox + rx, y + oy + ry), fill=int(g.integers(120, 230)))
        alpha = np.asarray(clouds.filter(ImageFilter.GaussianBlur(14)), np.float32)[..., None] / 255
        sky = sky * (1 - alpha) + 250 * alpha
    return sky


def _far_background(image: Image.Image, g: np.random.Generator, horizon: float) -> None:
    draw = ImageDraw.Draw(image)
    kind = ("hills", "city", "trees", "sea", "mountains")[g.integers(5)]
    haze = _hsv(g.uniform(0.55, 0.65), g.uniform(0.1, 0.3), g.uniform(0.55, 0.75))
    if kind in ("hills", "mountains"):
        amplitude = H * (0.18 if kind == "mountains" else 0.07)
        xs = np.linspace(0, W, 40)
        ys = horizon - amplitude * (0.5 + 0.5 * _smooth_noise(g, 40, 1, 5 if kind == "mountains" else 12)[0])
        color = haze if kind == "mountains" else _hsv(g.uniform(0.22, 0.35), g.uniform(0.3, 0.5), g.uniform(0.35, 0.55))
        draw.polygon([(0, horizon + 2), *zip(xs, ys), (W, horizon + 2)], fill=color)
    elif kind == "city":
        x = 0.0
        while x < W:
            bw, bh = g.uniform(25, 90), g.uniform(20, 140)
            draw.rectangle((x, horizon - bh, x + bw, horizon + 2), fill=_shade(haze, g.uniform(0.9, 1.15)))
            x += bw + g.uniform(0, 15)
    elif kind == "trees":
        color = _hsv(g.uniform(0.25, 0.38), g.uniform(0.35, 0.6), g.uniform(0.25, 0.45))
        for x in np.arange(-20, W + 20, 18):
            r = g.uniform(18, 40)
            draw.ellipse(
                (x - r, horizon - r * 1.6, x + r, horizon + r * 0.4), fill=_shade(color, g.uniform(0.85, 1.15))
            )
    else:
        draw.rectangle((0, horizon - H * 0.02, W, horizon + 2), fill=_hsv(g.uniform(0.55, 0.6), 0.5, 0.55))


def _ground(image: Image.Image, g: np.random.Generator, gy: float, rng_tex: np.random.Generator) -> None:
    kind = ("grass", "plaza", "water", "sand", "road")[g.integers(5)]
    gh = H - int(gy)
    if kind == "grass":
        mat = Material("flat", _hsv(g.uniform(0.22, 0.32), g.uniform(0.4, 0.65), g.uniform(0.4, 0.65)), (0, 0, 0))
    elif kind == "plaza":
        mat = Material("stone", _hsv(g.uniform(0.05, 0.12), g.uniform(0.05, 0.25), g.uniform(0.55, 0.8)), (0, 0, 0), 10)
    elif kind == "water":
        mat = Material("flat", _hsv(g.uniform(0.52, 0.6), g.uniform(0.4, 0.7), g.uniform(0.35, 0.6)), (0, 0, 0))
    elif kind == "sand":
        mat = Material("flat", _hsv(g.uniform(0.1, 0.13), g.uniform(0.25, 0.45), g.uniform(0.75, 0.9)), (0, 0, 0))
    else:
        mat = Material("flat", _hsv(0.6, 0.05, g.uniform(0.3, 0.45)), (0, 0, 0))
    tex = _texture(mat, W, gh, rng_tex) * (1.0 + 0.1 * _smooth_noise(rng_tex, W, gh, 30))[..., None]
    image.paste(_to_image(tex), (0, int(gy)))
    draw = ImageDraw.Draw(image)
    vx = W * g.uniform(0.3, 0.7)
    if kind in ("plaza", "road"):  # lines converging on a vanishing point give depth
        for k in range(-12, 13):
            draw.line([(vx + k * 6, gy), (vx + k * 140, H)], fill=_shade(mat.base, 0.8), width=2)
        y = gy
        step = 6.0
        while y < H:
            draw.line([(0, y), (W, y)], fill=_shade(mat.base, 0.85), width=1)
            step *= 1.35
            y += step
    elif kind == "water":
        for _ in range(120):
            y = g.uniform(gy, H)
            x = g.uniform(0, W)
            length = g.uniform(20, 120) * (y - gy) / gh + 10
            draw.line([(x, y), (x + length, y)], fill=_shade(mat.base, g.uniform(1.15, 1.4)), width=2)


def _side_props(image: Image.Image, g: np.random.Generator, gy: float, keep_clear: tuple) -> None:
    """Trees and lamp posts that belong to the place (they appear in every view of it)."""
    draw = ImageDraw.Draw(image)
    x0, x1 = keep_clear
    for _ in range(int(g.integers(0, 7))):
        x = g.uniform(0, W)
        if x0 - 40 < x < x1 + 40:
            continue
        if g.random() < 0.6:
            h = g.uniform(0.08, 0.2) * H
            base = gy + g.uniform(0, 0.1) * H
            draw.rectangle((x - 4, base - h * 0.5, x + 4, base), fill=(80, 60, 40))
            green = _hsv(g.uniform(0.22, 0.35), g.uniform(0.4, 0.7), g.uniform(0.25, 0.5))
            for _ in range(4):
                r = h * g.uniform(0.2, 0.35)
                ox, oy = g.uniform(-r, r) * 0.6, g.uniform(-h * 0.9, -h * 0.5)
                draw.ellipse(
                    (x + ox - r, base + oy - r, x + ox + r, base + oy + r), fill=_shade(green, g.uniform(0.85, 1.15))
                )
        else:
            h = g.uniform(0.1, 0.16) * H
            base = gy + g.uniform(0, 0.08) * H
            draw.line([(x, base), (x, base - h)], fill=(40, 40, 45), width=4)
            draw.ellipse((x - 9, base - h - 9, x + 9, base - h + 9), fill=(250, 240, 190))


def render_landmark(spec: LandmarkSpec) -> tuple[Image.Image, Image.Image]:
    """The canonical picture of a landmark, and the mask of its structure (255 where it stands)."""
    g_shape = np.random.default_rng(spec.shape_seed)
    g_colour = np.random.default_rng(spec.colour_seed)
    g_setting = np.random.default_rng(spec.setting_seed)
    palette = _make_palette(g_colour)
    gy = H * g_setting.uniform(0.64, 0.76)
    cx = W * (0.5 + g_setting.uniform(-0.06, 0.06))

    image = _to_image(_sky(g_setting))
    _far_background(image, g_setting, gy)
    _ground(image, g_setting, gy, np.random.default_rng(spec.setting_seed + 1))
    layer = Layer((W, H), np.random.default_rng(spec.colour_seed + 1))
    FAMILY_DRAWERS[spec.family](layer, g_shape, palette, cx, gy)
    layer.composite_onto(image)
    bbox = layer.alpha.getbbox() or (0, 0, W, H)
    _side_props(image, g_setting, gy, (bbox[0], bbox[2]))
    return image, layer.alpha


# ---------------------------------------------------------------------------------------------
# Taking photos: viewpoint, lighting, occluders
# ---------------------------------------------------------------------------------------------


def _output_size(g: np.random.Generator) -> tuple[int, int]:
    aw, ah = ASPECTS[g.integers(len(ASPECTS))]
    long_side = int(g.integers(LONG_SIDE[0], LONG_SIDE[1] + 1))
    if aw >= ah:
        return long_side, max(16, round(long_side * ah / aw))
    return max(16, round(long_side * aw / ah)), long_side


def _perspective_coefficients(dst_size, quad) -> tuple:
    """PIL PERSPECTIVE data mapping output pixel (x, y) to the source point inside `quad`."""
    w, h = dst_size
    rows, rhs = [], []
    for (x, y), (u, v) in zip(((0, 0), (w, 0), (w, h), (0, h)), quad):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return tuple(np.linalg.solve(np.array(rows, float), np.array(rhs, float)).tolist())


def _view_quad(g: np.random.Generator, bbox, structure_points: np.ndarray, out_size) -> np.ndarray:
    """Where in the canonical scene the camera looks: a rotated, keystoned window around the structure."""
    ow, oh = out_size
    aspect = ow / oh
    sx0, sy0, sx1, sy1 = bbox
    sw, sh = sx1 - sx0, sy1 - sy0
    focus = np.array([(sx0 + sx1) / 2, (sy0 + sy1) / 2])
    if g.random() < 0.75:  # the whole structure, with some surroundings
        win_h = sh * g.uniform(1.15, 1.9)
        win_w = win_h * aspect
        if win_w < sw * 1.05:
            win_w = sw * g.uniform(1.05, 1.4)
            win_h = win_w / aspect
    else:  # closer: a part of it fills the frame
        win_h = sh * g.uniform(0.55, 0.9)
        win_w = win_h * aspect
        focus = structure_points[g.integers(len(structure_points))].astype(float)
    if win_w > W:
        win_w, win_h = W, W / aspect
    if win_h > H:
        win_w, win_h = H * aspect, H
    cx = focus[0] + g.normal(0, 0.08) * win_w
    cy = focus[1] + g.normal(0, 0.08) * win_h
    cx = min(max(cx, win_w / 2), W - win_w / 2)
    cy = min(max(cy, win_h / 2), H - win_h / 2)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * [win_w / 2, win_h / 2]
    yaw, pitch = g.uniform(-0.14, 0.14), g.uniform(-0.04, 0.12)
    corners[:, 1] *= 1 + yaw * np.sign(corners[:, 0]) * -1  # one side nearer the camera
    corners[:, 0] *= 1 + pitch * np.sign(corners[:, 1]) * -1  # looking up: verticals converge
    angle = math.radians(g.uniform(-6, 6))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    corners = corners @ rot.T + g.normal(0, 0.012, (4, 2)) * [win_w, win_h]
    # Shrink towards the centre until the whole window lies inside the scene.
    limits = [1.0]
    for dx, dy in corners:
        if dx:
            limits.append(((W - cx) if dx > 0 else cx) / abs(dx))
        if dy:
            limits.append(((H - cy) if dy > 0 else cy) / abs(dy))
    return corners * min(limits) * 0.999 + [cx, cy]


def _relight(image: Image.Image, g: np.random.Generator, strength: float = 1.0) -> Image.Image:
    """Exposure, contrast, saturation, white balance, a light falloff across the frame, sometimes haze."""
    saturation = 1 + strength * g.uniform(-0.4, 0.3)
    contrast = 1 + strength * g.uniform(-0.25, 0.2)
    exposure = 1 + strength * g.uniform(-0.3, 0.25)
    warmth = strength * g.uniform(-0.1, 0.1)
    falloff_x, falloff_y = strength * g.uniform(-0.2, 0.2), strength * g.uniform(-0.15, 0.1)
    haze = g.random() < 0.15 * strength
    # All colour changes are affine, so one 3x4 matrix applies them in C: saturation around the
    # pixel's grey, contrast around the picture's mean, then exposure and white balance per channel.
    mean = _mean_level(image)
    grey = np.full((3, 3), 1 / 3)
    m = grey + saturation * (np.eye(3) - grey)
    m = contrast * m
    offset = (1 - contrast) * mean * np.ones(3)
    gains = exposure * np.array([1 + warmth, 1.0, 1 - warmth])
    # The falloff multiplies by up to `peak`; ImageChops.multiply scales by value/255, so divide first.
    peak = 1 + abs(falloff_x) + abs(falloff_y)
    m, offset = m * (gains / peak)[:, None], offset * gains / peak
    matrix = tuple(np.concatenate([m, offset[:, None]], axis=1).ravel().tolist())
    image = image.convert("RGB", matrix)
    corners = np.array(
        [
            [1 - falloff_x - falloff_y, 1 + falloff_x - falloff_y],
            [1 - falloff_x + falloff_y, 1 + falloff_x + falloff_y],
        ],
        np.float32,
    )
    ramp = Image.fromarray(np.clip(corners / peak * 255, 0, 255).astype(np.uint8), "L")
    ramp = ramp.resize(image.size, Image.BILINEAR).convert("RGB")
    image = ImageChops.multiply(image, ramp)
    if haze:
        image = Image.blend(image, Image.new("RGB", image.size, _hsv(0.58, 0.08, 0.9)), 0.25)
    return image


def _mean_level(image: Image.Image) -> float:
    """Mean of all channels (of a reduced copy: it only sets the pivot of the contrast change)."""
    return float(np.mean(ImageStat.Stat(image.reduce(4) if min(image.size) >= 64 else image).mean))


def _occlude(image: Image.Image, g: np.random.Generator) -> None:
    """Things between the camera and the landmark: people, trees, cars, signs, a blurry finger."""
    w, h = image.size
    draw = ImageDraw.Draw(image)
    for _ in range(int(g.choice([0, 0, 1, 1, 2, 3, 4]))):
        kind = ("person", "person", "tree", "car", "sign")[g.integers(5)]
        x = g.uniform(0, w)
        base = h * g.uniform(0.8, 1.1)
        color = _hsv(g.uniform(0, 1), g.uniform(0.2, 0.8), g.uniform(0.15, 0.8))
        if kind == "person":
            ph = h * g.uniform(0.15, 0.45)
            bw = ph * 0.28
            draw.rounded_rectangle((x - bw / 2, base - ph * 0.82, x + bw / 2, base), radius=bw * 0.3, fill=color)
            skin = _hsv(g.uniform(0.04, 0.09), g.uniform(0.3, 0.6), g.uniform(0.35, 0.9))
            draw.ellipse((x - bw * 0.3, base - ph, x + bw * 0.3, base - ph * 0.8), fill=skin)
        elif kind == "tree":
            th = h * g.uniform(0.3, 0.7)
            x = g.uniform(0, w * 0.15) if g.random() < 0.5 else g.uniform(w * 0.85, w)
            draw.rectangle((x - th * 0.03, base - th * 0.6, x + th * 0.03, base), fill=(70, 52, 35))
            green = _hsv(g.uniform(0.22, 0.35), g.uniform(0.4, 0.7), g.uniform(0.2, 0.5))
            for _ in range(5):
                r = th * g.uniform(0.15, 0.28)
                ox, oy = g.uniform(-r, r), g.uniform(-th, -th * 0.55)
                draw.ellipse(
                    (x + ox - r, base + oy - r, x + ox + r, base + oy + r), fill=_shade(green, g.uniform(0.8, 1.2))
                )
        elif kind == "car":
            ch = h * g.uniform(0.08, 0.18)
            cw = ch * g.uniform(2.2, 3.0)
            draw.rounded_rectangle((x - cw / 2, base - ch, x + cw / 2, base - ch * 0.2), radius=ch * 0.2, fill=color)
            draw.polygon(
                [
                    (x - cw * 0.3, base - ch),
                    (x + cw * 0.25, base - ch),
                    (x + cw * 0.15, base - ch * 1.5),
                    (x - cw * 0.2, base - ch * 1.5),
                ],
                fill=_shade(color, 0.8),
            )
            for wx in (x - cw * 0.3, x + cw * 0.3):
                draw.ellipse((wx - ch * 0.25, base - ch * 0.45, wx + ch * 0.25, base + ch * 0.05), fill=(20, 20, 20))
        else:
            sw, sh = w * g.uniform(0.05, 0.15), h * g.uniform(0.05, 0.12)
            y = h * g.uniform(0.3, 0.8)
            draw.line([(x, y), (x, base)], fill=(60, 60, 60), width=max(2, int(w / 200)))
            draw.rectangle((x - sw / 2, y - sh, x + sw / 2, y), fill=color)
    if g.random() < 0.05:  # a finger over the lens corner
        r = min(w, h) * g.uniform(0.2, 0.35)
        blob = Image.new("L", (w, h), 0)
        cx = 0 if g.random() < 0.5 else w
        ImageDraw.Draw(blob).ellipse((cx - r, h - r * 1.4, cx + r, h + r * 0.6), fill=255)
        blob = blob.filter(ImageFilter.GaussianBlur(r * 0.2))
        image.paste(_hsv(0.05, 0.45, 0.45), (0, 0, w, h), blob)


def _camera_noise(image: Image.Image, g: np.random.Generator) -> Image.Image:
    if g.random() < 0.35:
        image = image.filter(ImageFilter.GaussianBlur(g.uniform(0.4, 1.8)))
    if g.random() < 0.3:  # sensor noise, the same in all channels
        sigma = g.uniform(2, 7)
        noise = g.standard_normal((image.size[1], image.size[0], 1), dtype=np.float32) * sigma
        image = _to_image(np.asarray(image, np.float32) + noise)
    return image


class _Scene:
    """A landmark's canonical picture with lazily built reduced copies for sharp downscaled views."""

    def __init__(self, spec: LandmarkSpec):
        self.image, mask = render_landmark(spec)
        self.bbox = mask.getbbox() or (0, 0, W, H)
        # A sparse sample of the structure's pixels: close-up views aim at one of them.
        step = 8
        ys, xs = np.nonzero(np.asarray(mask)[::step, ::step])
        self.structure_points = np.stack([xs, ys], axis=1) * step if len(xs) else np.array([[W // 2, H // 2]])
        self._reduced: dict[int, Image.Image] = {1: self.image}

    def reduced(self, factor: int) -> Image.Image:
        if factor not in self._reduced:
            self._reduced[factor] = self.image.reduce(factor)
        return self._reduced[factor]


def photograph(scene: _Scene, g: np.random.Generator) -> Image.Image:
    """One upright RGB photo of a scene from a random viewpoint."""
    out_size = _output_size(g)
    quad = _view_quad(g, scene.bbox, scene.structure_points, out_size)
    # Pre-shrink the source for strong downscaling: PERSPECTIVE resampling does not antialias.
    factor = int(min(4, max(1, np.linalg.norm(quad[1] - quad[0]) / out_size[0] // 1.5)))
    source = scene.reduced(factor)
    coeffs = _perspective_coefficients(out_size, [tuple(p / factor) for p in quad])
    image = source.transform(out_size, Image.PERSPECTIVE, coeffs, Image.BILINEAR)
    image = _relight(image, g)
    _occlude(image, g)
    return _camera_noise(image, g)


# ---------------------------------------------------------------------------------------------
# Non-landmark photos: unique everyday scenes in a few shared styles
# ---------------------------------------------------------------------------------------------


def _indoor_colour(g: np.random.Generator) -> tuple[int, int, int]:
    """Warm, muted interior tones shared by all non-landmark styles."""
    return _hsv(g.uniform(0.02, 0.14), g.uniform(0.08, 0.4), g.uniform(0.45, 0.92))


def _object_colour(g: np.random.Generator) -> tuple[int, int, int]:
    return _hsv(g.uniform(0, 1), g.uniform(0.3, 0.85), g.uniform(0.3, 0.95))


def _nl_room(image, g):
    w, h = image.size
    draw = ImageDraw.Draw(image)
    wall, floor = _indoor_colour(g), _shade(_indoor_colour(g), 0.7)
    horizon = h * g.uniform(0.55, 0.72)
    draw.rectangle((0, 0, w, horizon), fill=wall)
    for x in np.arange(0, w, g.uniform(12, 40)):  # wallpaper stripes
        draw.line([(x, 0), (x, horizon)], fill=_shade(wall, 0.95), width=2)
    draw.rectangle((0, horizon, w, h), fill=floor)
    for k in range(-8, 9):  # floor boards
        draw.line([(w / 2 + k * w * 0.03, horizon), (w / 2 + k * w * 0.25, h)], fill=_shade(floor, 0.85), width=2)
    if g.random() < 0.6:  # window
        wx, ww = g.uniform(0.05, 0.6) * w, g.uniform(0.15, 0.3) * w
        draw.rectangle(
            (wx, h * 0.1, wx + ww, horizon * 0.75), fill=_hsv(0.58, 0.2, 0.95), outline=(240, 240, 235), width=5
        )
        draw.line([(wx + ww / 2, h * 0.1), (wx + ww / 2, horizon * 0.75)], fill=(240, 240, 235), width=4)
    for _ in range(int(g.integers(1, 4))):  # pictures
        px, py = g.uniform(0, w * 0.9), g.uniform(h * 0.08, horizon * 0.5)
        pw, ph = g.uniform(0.06, 0.16) * w, g.uniform(0.06, 0.16) * h
        draw.rectangle((px, py, px + pw, py + ph), fill=_object_colour(g), outline=(60, 40, 25), width=4)
    for _ in range(int(g.integers(1, 4))):  # furniture: sofa, table, shelf
        kind = ("sofa", "table", "shelf")[g.integers(3)]
        fx, fw = g.uniform(-0.1, 0.8) * w, g.uniform(0.2, 0.45) * w
        color = _object_colour(g) if g.random() < 0.5 else _shade(_indoor_colour(g), 0.6)
        if kind == "sofa":
            fh = fw * 0.35
            draw.rounded_rectangle((fx, horizon - fh * 0.5, fx + fw, horizon + fh * 0.5), radius=fh * 0.2, fill=color)
            draw.rounded_rectangle(
                (fx, horizon - fh * 0.9, fx + fw, horizon - fh * 0.3), radius=fh * 0.2, fill=_shade(color, 0.85)
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
            fill=_hsv(0.12, 0.3, 0.95),
        )


def _nl_texture(image, g):
    w, h = image.size
    kind = ("wood", "fabric", "tiles", "gravel", "brick")[g.integers(5)]
    base = _indoor_colour(g) if g.random() < 0.7 else _object_colour(g)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    b = np.array(base, np.float32)
    if kind == "wood":
        period = g.uniform(6, 20)
        rings = np.sin((yy + 25 * _smooth_noise(g, w, h, 120)) / period * 2 * math.pi)
        arr = b * (0.85 + 0.15 * rings)[..., None]
    elif kind == "fabric":
        p = g.uniform(3, 8)
        weave = np.sin(xx / p * math.pi) * np.sin(yy / p * math.pi)
        arr = b * (0.9 + 0.12 * weave + 0.05 * _smooth_noise(g, w, h, 40))[..., None]
    elif kind == "tiles":
        s = g.uniform(20, 70)
        grout = ((xx % s) < 3) | ((yy % s) < 3)
        arr = b * (1 + 0.06 * _smooth_noise(g, w, h, s))[..., None]
        arr[grout] = _shade(base, 0.6)
    elif kind == "gravel":
        arr = np.broadcast_to(b * 0.7, (h, w, 3)).copy()
        img = _to_image(arr)
        draw = ImageDraw.Draw(img)
        for _ in range(int(w * h / 150)):
            x, y, r = g.uniform(0, w), g.uniform(0, h), g.uniform(2, 9)
            draw.ellipse((x - r, y - r * 0.8, x + r, y + r * 0.8), fill=_shade(base, g.uniform(0.6, 1.3)))
        arr = np.asarray(img, np.float32)
    else:
        arr = _texture(Material("brick", base, _shade(base, 1.3), g.uniform(10, 30)), w, h, g)
    image.paste(_to_image(arr), (0, 0))


def _nl_tabletop(image, g):
    w, h = image.size
    draw = ImageDraw.Draw(image)
    table = _indoor_colour(g)
    draw.rectangle((0, 0, w, h), fill=table)
    for x in np.arange(0, w, g.uniform(30, 90)):
        draw.line([(x, 0), (x + g.uniform(-20, 20), h)], fill=_shade(table, 0.9), width=2)
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
            draw.rectangle((x, y, x + s, y + s * g.uniform(0.3, 1.5)), fill=color, outline=_shade(color, 0.6))
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
    image.paste(_to_image(np.array(back, np.float32) * (1 + 0.15 * _smooth_noise(g, w, h, 80))[..., None]), (0, 0))
    draw = ImageDraw.Draw(image)
    cx = w * g.uniform(0.35, 0.65)
    head = min(w, h) * g.uniform(0.22, 0.38)
    hy = h * g.uniform(0.3, 0.5)
    shirt = _object_colour(g)
    draw.ellipse((cx - head * 1.6, hy + head * 0.9, cx + head * 1.6, hy + head * 4), fill=shirt)
    skin = _hsv(g.uniform(0.03, 0.1), g.uniform(0.25, 0.6), g.uniform(0.35, 0.92))
    draw.rectangle((cx - head * 0.3, hy + head * 0.5, cx + head * 0.3, hy + head * 1.1), fill=_shade(skin, 0.9))
    draw.ellipse((cx - head * 0.75, hy - head, cx + head * 0.75, hy + head), fill=skin)
    hair = _hsv(g.uniform(0.02, 0.12), g.uniform(0.2, 0.7), g.uniform(0.05, 0.6))
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
    draw.rectangle((0, 0, w, h), fill=_shade(_indoor_colour(g), 0.6))
    px0, py0 = w * g.uniform(0.02, 0.15), h * g.uniform(0.02, 0.15)
    px1, py1 = w * g.uniform(0.85, 0.98), h * g.uniform(0.85, 0.98)
    paper = _hsv(g.uniform(0.1, 0.15), g.uniform(0.0, 0.08), g.uniform(0.9, 0.99))
    draw.rectangle((px0, py0, px1, py1), fill=paper)
    line_h = g.uniform(8, 18)
    y = py0 + line_h * 2
    ink = _hsv(g.uniform(0.55, 0.7), g.uniform(0, 0.4), g.uniform(0.1, 0.3))
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
    image = Image.new("RGB", _output_size(g))
    NONLANDMARK_DRAWERS[style](image, g)
    if g.random() < 0.25 and style != "texture":  # close-up or shot from an angle: crop and rescale
        w, h = image.size
        box = (g.uniform(0, 0.15) * w, g.uniform(0, 0.15) * h, g.uniform(0.85, 1) * w, g.uniform(0.85, 1) * h)
        image = image.resize((w, h), Image.BICUBIC, box=box)
    image = _relight(image, g, strength=0.6)
    return _camera_noise(image, g)


# ---------------------------------------------------------------------------------------------
# Encoding: JPEG, PNG, RGBA, grayscale, CMYK, EXIF-rotated
# ---------------------------------------------------------------------------------------------

EXIF_ORIENTATION_TAG = 0x0112
# Stored pixels for each EXIF orientation: `ImageOps.exif_transpose` undoes exactly this.
STORE_TRANSPOSE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def encode(image: Image.Image, variant: str, g: np.random.Generator) -> tuple[bytes, str]:
    """Encode an upright RGB photo as `variant`; returns the bytes and the file extension."""
    buffer = io.BytesIO()
    quality = int(g.integers(72, 96))
    if variant in ("jpeg", "progressive_jpeg"):
        image.save(buffer, "JPEG", quality=quality, progressive=variant == "progressive_jpeg")
    elif variant == "png":
        image.save(buffer, "PNG", compress_level=6)
    elif variant == "rgba_png":
        # A cut-out with rounded transparent corners, as exported by phones and editors.
        w, h = image.size
        alpha = Image.new("L", image.size, 0)
        ImageDraw.Draw(alpha).rounded_rectangle((0, 0, w - 1, h - 1), radius=min(w, h) * 0.12, fill=255)
        rgba = image.convert("RGBA")
        rgba.putalpha(alpha)
        rgba.save(buffer, "PNG", compress_level=6)
    elif variant == "gray_jpeg":
        image.convert("L").save(buffer, "JPEG", quality=quality)
    elif variant == "cmyk_jpeg":
        image.convert("CMYK").save(buffer, "JPEG", quality=quality)
    elif variant.startswith("exif_"):
        orientation = int(variant.split("_")[1])
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = orientation
        image.transpose(STORE_TRANSPOSE[orientation]).save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return buffer.getvalue(), (".png" if variant.endswith("png") else ".jpg")


def corrupt_jpeg(data: bytes) -> bytes:
    """Keep the JPEG headers (SOI, tables, SOF, SOS) but damage the scan and drop its end.

    `Image.open` succeeds (the header is fine), `Image.load` fails. Deterministic for given bytes.
    """
    sos = data.find(b"\xff\xda")
    if sos < 0:
        return data[: len(data) // 2]
    scan_start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    scan = data[scan_start:]
    keep = max(16, len(scan) * 2 // 5)
    noise = random.Random(zlib.crc32(data))
    # No 0xFF in the garbage, so it can never hold an end-of-image marker that would make the damaged
    # file decode "cleanly"; the invalid marker 0xFF02 right after the kept scan makes libjpeg fail.
    garbage = bytes(noise.randrange(255) for _ in range(min(4096, max(64, len(scan) // 10))))
    return data[:scan_start] + scan[:keep] + b"\xff\x02" + garbage


# ---------------------------------------------------------------------------------------------
# The plan: which photo gets which id, label, file variant and fault
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    image_id: str
    landmark_index: int | None  # None: a non-landmark photo
    number: int  # view number of the landmark, or index of the non-landmark photo
    variant: str
    fault: str | None


def landmark_specs(seed: int, n_landmarks: int) -> list[LandmarkSpec]:
    """The landmarks: structure families in turn, every TWIN_EVERY-th one a look-alike of the one before."""
    g = _rng(seed, "families")
    order = [STRUCTURE_FAMILIES[i] for i in g.permutation(len(STRUCTURE_FAMILIES))]
    specs: list[LandmarkSpec] = []
    for i in range(n_landmarks):
        seeds = [int(x) for x in _rng(seed, "landmark", i).integers(0, 2**62, 3)]
        if i % TWIN_EVERY == TWIN_EVERY - 1:
            # A look-alike of the previous landmark: the same geometry in other colours, or the
            # same colours and setting with other geometry of the same family.
            prev = specs[i - 1]
            if (i // TWIN_EVERY) % 2 == 0:
                spec = LandmarkSpec(i, prev.family, prev.shape_seed, seeds[1], prev.setting_seed, twin_of=i - 1)
            else:
                spec = LandmarkSpec(i, prev.family, seeds[0], prev.colour_seed, prev.setting_seed, twin_of=i - 1)
        else:
            spec = LandmarkSpec(i, order[i % len(order)], *seeds)
        specs.append(spec)
    return specs


def plan_photos(seed: int, n_landmarks: int, views: int, n_nonlandmarks: int, broken_fraction: float) -> list[Photo]:
    """Every photo of the set, landmarks' views first: its id, file variant and fault (if any)."""
    g = _rng(seed, "plan")
    keys = [(i, v) for i in range(n_landmarks) for v in range(views)] + [(None, k) for k in range(n_nonlandmarks)]
    ids = [
        _image_id(seed, "landmark" if i is not None else "nonlandmark", i if i is not None else 0, n) for i, n in keys
    ]
    if len(set(ids)) != len(ids):
        raise StageError("image id collision; choose another seed")
    # Broken links: the same fraction of landmark and of non-landmark rows, kinds taken in turn.
    landmark_rows = [r for r, (i, _) in enumerate(keys) if i is not None]
    other_rows = [r for r, (i, _) in enumerate(keys) if i is None]
    broken: list[int] = []
    for rows in (landmark_rows, other_rows):
        count = int(round(broken_fraction * len(rows)))
        broken += [rows[j] for j in g.permutation(len(rows))[:count]]
    broken = [broken[j] for j in g.permutation(len(broken))]
    first_kind = int(g.integers(len(FAULT_KINDS)))
    faults = {row: FAULT_KINDS[(first_kind + k) % len(FAULT_KINDS)] for k, row in enumerate(broken)}
    # File variants among the good rows: fixed quotas, so each one is present in small sets too.
    good = [r for r in range(len(keys)) if r not in faults]
    good = [good[j] for j in g.permutation(len(good))]
    variants: dict[int, str] = {}
    position = 0
    for variant, share in VARIANT_SHARES.items():
        quota = max(1, int(round(share * len(good))))
        for row in good[position : position + quota]:
            variants[row] = variant
        position += quota
    rest = good[position:]
    for row in rest[: int(round(PROGRESSIVE_SHARE * len(good)))]:
        variants[row] = "progressive_jpeg"
    return [Photo(ids[r], i, n, variants.get(r, "jpeg"), faults.get(r)) for r, (i, n) in enumerate(keys)]


def plan_new_photos(seed: int, n_landmarks: int, new_photos: int) -> list[Photo]:
    """The new photos for `predict`: a new view of each of the first `new_photos` landmarks (in turn,
    view after view, when there are fewer landmarks), then ceil(new_photos / 2) new non-landmark photos.

    Their `image_id` is the file name without extension, photo-01, photo-02, ... in a shuffled order;
    `number` is the new view's number (landmarks) or the photo's index (non-landmarks). Variants are
    drawn with the set's shares, so most are plain JPEGs.
    """
    if new_photos <= 0:
        return []
    keys = [(k % n_landmarks, k // n_landmarks) for k in range(new_photos)]
    keys += [(None, k) for k in range((new_photos + 1) // 2)]
    g = _rng(seed, "new_photo_plan")
    numbers = np.empty(len(keys), int)
    numbers[g.permutation(len(keys))] = np.arange(1, len(keys) + 1)
    shares = {"progressive_jpeg": PROGRESSIVE_SHARE, **VARIANT_SHARES}
    choices = ["jpeg", *shares]
    weights = np.array([1.0 - sum(shares.values()), *shares.values()])
    variants = [choices[j] for j in g.choice(len(choices), len(keys), p=weights / weights.sum())]
    width = max(2, len(str(len(keys))))
    return [Photo(f"photo-{int(numbers[r]):0{width}d}", i, n, variants[r], None) for r, (i, n) in enumerate(keys)]


# ---------------------------------------------------------------------------------------------
# Generation (in worker processes)
# ---------------------------------------------------------------------------------------------


def _write_photo(images_dir: Path, photo: Photo, image: Image.Image, g: np.random.Generator) -> dict:
    data, ext = encode(image, photo.variant, g)
    name = photo.image_id + ext
    write_bytes_atomic(images_dir / name, data)
    return {"id": photo.image_id, "file": name, "variant": photo.variant, "bytes": len(data)}


def _landmark_task(args) -> list[dict]:
    """The views of one landmark, then its new photos (if any) while its scene is at hand."""
    seed, images_dir, spec, photos, new_dir, new_photos = args
    scene = _Scene(spec)
    out = []
    for photo in photos:
        g = _rng(seed, "view", spec.index, photo.number)
        out.append(_write_photo(images_dir, photo, photograph(scene, g), g))
    for photo in new_photos:
        g = _rng(seed, NEW_VIEW_TAG, spec.index, photo.number)
        out.append({**_write_photo(new_dir, photo, photograph(scene, g), g), "new": True})
    return out


def _nonlandmark_task(args) -> list[dict]:
    """Non-landmark photos of the set, or (`new`) new ones for `predict`, from their own streams."""
    seed, images_dir, photos, new = args
    out = []
    for photo in photos:
        g = _rng(seed, NEW_NONLANDMARK_TAG if new else "nonlandmark", photo.number)
        style = NONLANDMARK_STYLES[photo.number % len(NONLANDMARK_STYLES)]
        written = _write_photo(images_dir, photo, render_nonlandmark(style, g), g)
        out.append({**written, "new": True} if new else written)
    return out


def _run_task(task):
    kind, args = task
    return (_landmark_task if kind == "landmark" else _nonlandmark_task)(args)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def generate(
    out_dir,
    *,
    seed: int = 2026,
    n_landmarks: int = 48,
    views_per_landmark: int = 14,
    n_nonlandmarks: int = 240,
    broken_fraction: float = 0.08,
    base_url: str = DEFAULT_BASE_URL,
    workers: int | None = None,
    new_photos: int = 8,
) -> dict:
    """Write the demo set into out_dir (see the module docstring); returns its counts.

    `new_photos`: how many new landmark photos to write into out_dir/new_photos (plus half as many,
    rounded up, non-landmark ones); 0 writes none. They never change the set's own files.
    """
    if n_landmarks < 1 or views_per_landmark < 1 or n_nonlandmarks < 0:
        raise StageError("need at least 1 landmark with 1 view, and a non-negative number of non-landmarks")
    if new_photos < 0:
        raise StageError(f"new_photos must be non-negative, got {new_photos}")
    if not 0 <= broken_fraction < 1:
        raise StageError(f"broken_fraction must be in [0, 1), got {broken_fraction}")
    if seed < 0:
        raise StageError(f"seed must be non-negative, got {seed}")
    base_url = base_url.rstrip("/")
    if not re.match(r"^https?://[^/]+", base_url):
        raise StageError(f"base_url must start with http:// or https://, got {base_url!r}")
    started = time.monotonic()
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    new_dir = out_dir / "new_photos"
    new_dir.mkdir(exist_ok=True)  # also when empty: the workflow declares the folder as an output
    # urls.csv marks a complete set: remove it first, so an interrupted run never looks complete.
    (out_dir / "urls.csv").unlink(missing_ok=True)

    specs = landmark_specs(seed, n_landmarks)
    photos = plan_photos(seed, n_landmarks, views_per_landmark, n_nonlandmarks, broken_fraction)
    by_landmark: dict[int, list[Photo]] = {}
    others: list[Photo] = []
    for photo in photos:
        if photo.landmark_index is None:
            others.append(photo)
        else:
            by_landmark.setdefault(photo.landmark_index, []).append(photo)
    new_plan = plan_new_photos(seed, n_landmarks, new_photos)
    new_by_landmark: dict[int, list[Photo]] = {}
    for photo in new_plan:
        if photo.landmark_index is not None:
            new_by_landmark.setdefault(photo.landmark_index, []).append(photo)
    new_others = [p for p in new_plan if p.landmark_index is None]
    tasks = [
        ("landmark", (seed, images_dir, specs[i], ps, new_dir, new_by_landmark.get(i, [])))
        for i, ps in by_landmark.items()
    ]
    chunk = 12
    tasks += [("nonlandmark", (seed, images_dir, others[k : k + chunk], False)) for k in range(0, len(others), chunk)]
    if new_others:
        tasks.append(("nonlandmark", (seed, new_dir, new_others, True)))

    workers = min(workers or _available_cpus(), len(tasks))
    written: list[dict] = []
    if workers <= 1:
        for task in tasks:
            written += _run_task(task)
    else:
        # spawn: safe even when the caller runs threads (tests run the server in one).
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap_unordered(_run_task, tasks):
                written += result
    files = {w["id"]: w["file"] for w in written if not w.get("new")}
    new_files = {w["id"]: w["file"] for w in written if w.get("new")}

    # Remove photos a previous generation with other arguments left behind.
    expected = set(files.values())
    for path in images_dir.iterdir():
        if re.fullmatch(r"[0-9a-f]{16}\.(jpg|png)", path.name) and path.name not in expected:
            path.unlink()
    expected = set(new_files.values())
    for path in new_dir.iterdir():
        if _NEW_PHOTO_NAME.fullmatch(path.name) and path.name not in expected:
            path.unlink()

    # Sparse, shuffled integers like real landmark ids: nothing may assume they are 0..n-1.
    id_pool = np.arange(1, 200_000)
    landmark_ids = [int(x) for x in _rng(seed, "landmark_ids").choice(id_pool, n_landmarks, replace=False)]
    rows = []
    for photo in photos:
        name = files[photo.image_id]
        url = f"{base_url}/images/{name}" if photo.fault is None else f"{base_url}/fault/{photo.fault}/{name}"
        label = "" if photo.landmark_index is None else str(landmark_ids[photo.landmark_index])
        rows.append((photo.image_id, url, label))
    order = _rng(seed, "row_order").permutation(len(rows))
    rows = [rows[k] for k in order]
    new_rows = sorted(
        (new_files[p.image_id], "" if p.landmark_index is None else str(landmark_ids[p.landmark_index]))
        for p in new_plan
    )

    faults = sorted((p.image_id, p.fault) for p in photos if p.fault)
    write_text_atomic(out_dir / "faults.csv", _csv_text(("id", "fault"), faults))
    fault_counts = {kind: sum(1 for _, f in faults if f == kind) for kind in FAULT_KINDS}
    variant_counts = {v: sum(1 for p in photos if p.variant == v) for v in VARIANTS}
    counts = {
        "landmarks": n_landmarks,
        "landmark_images": sum(1 for p in photos if p.landmark_index is not None),
        "nonlandmark_images": len(others),
        "images": len(photos),
        "broken": len(faults),
        "faults": fault_counts,
        "variants": variant_counts,
        "lookalike_pairs": [[landmark_ids[s.twin_of], landmark_ids[s.index]] for s in specs if s.twin_of is not None],
        "new_photos": len(new_plan),
    }
    write_json_atomic(
        out_dir / "demo.json",
        {
            "arguments": {
                "seed": seed,
                "n_landmarks": n_landmarks,
                "views_per_landmark": views_per_landmark,
                "n_nonlandmarks": n_nonlandmarks,
                "broken_fraction": broken_fraction,
                "base_url": base_url,
            },
            "counts": counts,
            "families": {str(landmark_ids[s.index]): s.family for s in specs},
        },
    )
    write_text_atomic(out_dir / "new_photos.csv", _csv_text(NEW_PHOTOS_COLUMNS, new_rows))
    write_text_atomic(out_dir / "urls.csv", _csv_text(URLS_COLUMNS, rows))
    counts["seconds"] = round(time.monotonic() - started, 2)
    log.info(
        "wrote %d photos (%d landmarks, %d non-landmarks, %d broken links) and %d new photos to %s in %.1f s",
        len(photos),
        n_landmarks,
        len(others),
        len(faults),
        len(new_plan),
        out_dir,
        counts["seconds"],
    )
    return counts


def _csv_text(header, rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The fault-injecting HTTP server
# ---------------------------------------------------------------------------------------------

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\.(jpg|png)$")
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png"}
REMOVED_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Photo unavailable</title></head>\n"
    "<body><h1>This photo is no longer available</h1><p>It may have been removed by its owner.</p></body></html>\n"
)
# How long shutdown waits for in-flight requests; slow requests are woken at once anyway.
SHUTDOWN_GRACE_SECONDS = 2.0


def _build_app(root: Path, slow_seconds: float, stopping: asyncio.Event):
    from aiohttp import web

    images_dir = Path(root) / "images"

    def locate(name: str) -> tuple[Path, str]:
        """The photo's path and content type; names are plain file names, never paths."""
        match = _FILE_NAME.match(name)  # one dot, no slash: never leaves images/
        if not match:
            raise web.HTTPNotFound(text="not found\n")
        return images_dir / name, CONTENT_TYPES[match.group(1)]

    def read(path: Path) -> bytes:
        # Looked up per request: the server may start before `generate` has written the files.
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise web.HTTPNotFound(text="not found\n") from None

    async def photo(request: web.Request):
        path, content_type = locate(request.match_info["name"])
        return web.Response(body=read(path), content_type=content_type)

    async def fault(request: web.Request):
        kind = request.match_info["kind"]
        path, content_type = locate(request.match_info["name"])
        if kind == "not_found" or kind not in FAULT_KINDS:
            raise web.HTTPNotFound(text="not found\n")
        if kind == "server_error":
            raise web.HTTPInternalServerError(text="internal server error\n")
        if kind == "html":
            return web.Response(text=REMOVED_PAGE, content_type="text/html")
        data = read(path)
        if kind == "corrupt":
            return web.Response(body=corrupt_jpeg(data), content_type="image/jpeg")
        if kind == "slow":
            # Wait past the client's timeout, but wake at once when the server shuts down.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=slow_seconds)
            if stopping.is_set():
                raise web.HTTPServiceUnavailable(text="shutting down\n")
            return web.Response(body=data, content_type=content_type)
        # truncated: promise the whole file, send half of it, then drop the connection.
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.content_length = len(data)
        response.force_close()
        await response.prepare(request)
        await response.write(data[: max(1, len(data) // 2)])
        if request.transport is not None:  # None when the client has already gone
            request.transport.close()  # flushes what was written, then closes
        return response

    async def healthz(request: web.Request):
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/images/{name}", photo)
    app.router.add_get("/fault/{kind}/{name}", fault)
    app.router.add_get("/healthz", healthz)
    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, with a clear error when the port is taken."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise StageError(f"cannot resolve host {host!r}: {err}") from err
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart right after a stop
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise StageError(
                f"port {port} on {host} is already in use (is another demo server running?); "
                f"stop it or choose another port"
            ) from err
        raise StageError(f"cannot listen on {host}:{port}: {err}") from err
    sock.setblocking(False)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _start(root, host: str, port: int, slow_seconds: float, stopping: asyncio.Event, access_log: bool):
    """Start serving; returns the runner (for cleanup) and the port actually bound."""
    from aiohttp import web

    if not _is_loopback(host):
        log.warning("serving the demo on non-loopback host %s: it is reachable from other machines", host)
    sock = _bind(host, port)
    app = _build_app(Path(root), slow_seconds, stopping)
    runner = web.AppRunner(app, access_log=log if access_log else None, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    return runner, sock.getsockname()[1]


class DemoServer:
    """The demo server in a background thread, for tests and notebooks.

    with DemoServer("data/demo", port=0, slow_seconds=2) as server:
        urllib.request.urlopen(server.base_url + "/healthz")
    """

    def __init__(
        self, root, host: str = "127.0.0.1", port: int = 0, slow_seconds: float = 600.0, access_log: bool = False
    ):
        self.root, self.host, self.port = Path(root), host, port
        self.slow_seconds, self.access_log = slow_seconds, access_log
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> DemoServer:
        self._thread = threading.Thread(target=self._run, name="demo-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"demo server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as err:  # reported to the starting thread
            self._error = err
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        runner, self.port = await _start(
            self.root, self.host, self.port, self.slow_seconds, self._stopping, self.access_log
        )
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"demo server did not stop within {timeout} s")

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return not Path("/proc/self").exists()  # no procfs: trust kill()
    except OSError:
        return True


async def serve(
    root,
    host: str,
    port: int,
    *,
    parent_pid: int | None = None,
    ready_file=None,
    slow_seconds: float = 600.0,
    access_log: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT, or until process `parent_pid` is gone (checked every second)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    runner, bound_port = await _start(root, host, port, slow_seconds, stopping, access_log)
    original_parent = os.getppid()
    try:
        if not Path(root, "images").is_dir():
            log.info("%s/images does not exist yet; photos are looked up per request", root)
        if ready_file:
            write_json_atomic(
                ready_file,
                {
                    "pid": os.getpid(),
                    "host": host,
                    "port": bound_port,
                    "base_url": f"http://{host}:{bound_port}",
                    "root": str(root),
                },
            )
        log.info("serving %s on http://%s:%d (pid %d)", root, host, bound_port, os.getpid())
        while not stopping.is_set():
            if parent_pid is not None:
                # Reparenting also means the parent died (its pid may be reused later).
                orphaned = parent_pid == original_parent and os.getppid() != original_parent
                if orphaned or not process_alive(parent_pid):
                    log.info("parent process %d is gone; stopping", parent_pid)
                    break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=1.0)
    finally:
        stopping.set()  # wakes slow requests
        await runner.cleanup()
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)
        log.info("demo server stopped")


def start_server_process(
    root,
    host: str = "127.0.0.1",
    port: int = 8765,
    timeout: float = 30.0,
    *,
    log_path=None,
    slow_seconds: float | None = None,
) -> subprocess.Popen:
    """Start `python -m landmarks.demo serve` as a child of this process; return once it accepts
    connections. It exits by itself when this process dies. Raises StageError with its log if it fails."""
    tmp_dir = Path(tempfile.mkdtemp(prefix="landmarks-demo-server-"))
    ready_file = tmp_dir / "ready.json"
    log_file = Path(log_path) if log_path else tmp_dir / "server.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "landmarks.demo",
        "serve",
        "--root",
        str(root),
        "--host",
        host,
        "--port",
        str(port),
        "--parent-pid",
        str(os.getpid()),
        "--ready-file",
        str(ready_file),
    ]
    if slow_seconds is not None:
        command += ["--slow-seconds", str(slow_seconds)]
    with open(log_file, "ab") as log_fh:
        # The child imports this very package, installed or not (e.g. the Snakefile's src/ checkout).
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=log_fh, env=env)
    proc.demo_tmp_dir = tmp_dir  # removed by stop_server_process
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        exited = proc.poll() is not None
        if exited or time.monotonic() > deadline:
            why = f"exited with code {proc.returncode}" if exited else f"was not ready within {timeout} s"
            stop_server_process(proc, remove_tmp_dir=False)
            tail = log_file.read_text(errors="replace")[-3000:].strip()
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise StageError(f"demo server on {host}:{port} {why}; its log ({log_file}):\n{tail}")
        time.sleep(0.05)
    return proc


def stop_server_process(proc: subprocess.Popen, timeout: float = 10.0, *, remove_tmp_dir: bool = True) -> int | None:
    """Stop a server from start_server_process (SIGTERM, then SIGKILL after `timeout`)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    tmp_dir = getattr(proc, "demo_tmp_dir", None)
    if tmp_dir is not None and remove_tmp_dir:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return proc.returncode


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    url_scheme = __doc__[__doc__.index("URL scheme") :]
    parser = argparse.ArgumentParser(
        prog="python -m landmarks.demo",
        description=__doc__.split("\n\n")[0],
        epilog=url_scheme,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write the synthetic photo set, urls.csv and faults.csv")
    gen.add_argument("--out", required=True, help="output folder (e.g. data/demo)")
    gen.add_argument("--seed", type=int, default=2026)
    gen.add_argument("--landmarks", type=int, default=48, help="number of landmarks")
    gen.add_argument("--views", type=int, default=14, help="photos per landmark")
    gen.add_argument("--nonlandmarks", type=int, default=240, help="number of non-landmark photos")
    gen.add_argument("--broken-fraction", type=float, default=0.08, help="fraction of rows with a broken URL")
    gen.add_argument("--base-url", default=DEFAULT_BASE_URL, help="where the server will serve the set")
    gen.add_argument("--workers", type=int, default=None, help="processes (default: available CPUs)")
    gen.add_argument(
        "--new-photos",
        type=int,
        default=8,
        metavar="N",
        help="also write N new landmark photos and ceil(N/2) new non-landmark photos, unseen by "
        "any model, into OUT/new_photos with their answers in OUT/new_photos.csv (0: none)",
    )
    gen.add_argument("-v", "--verbose", action="store_true")

    srv = sub.add_parser("serve", help="serve a generated set over HTTP, with fault URLs")
    srv.add_argument("--root", required=True, help="the folder `generate` writes (it may not exist yet)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8765)
    srv.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    srv.add_argument("--ready-file", default=None, help="written (JSON) once connections are accepted")
    srv.add_argument("--slow-seconds", type=float, default=600.0, help="delay of /fault/slow/ responses")
    srv.add_argument("--no-access-log", action="store_true", help="do not log every request")
    srv.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "generate":
        counts = generate(
            args.out,
            seed=args.seed,
            n_landmarks=args.landmarks,
            views_per_landmark=args.views,
            n_nonlandmarks=args.nonlandmarks,
            broken_fraction=args.broken_fraction,
            base_url=args.base_url,
            workers=args.workers,
            new_photos=args.new_photos,
        )
        print(json.dumps(counts, sort_keys=True))
        return 0
    if args.parent_pid is not None and not process_alive(args.parent_pid):
        raise StageError(f"parent process {args.parent_pid} does not exist")
    asyncio.run(
        serve(
            args.root,
            args.host,
            args.port,
            parent_pid=args.parent_pid,
            ready_file=args.ready_file,
            slow_seconds=args.slow_seconds,
            access_log=not args.no_access_log,
        )
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
