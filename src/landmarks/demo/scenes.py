"""What a landmark looks like: its spec (structure family and seeds), palette, the twelve structure
drawers, and the setting around it (sky, far background, ground, trees and lamps). `render_landmark`
paints one landmark's canonical scene, which the camera then photographs from many views."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .canvas import Layer, Material, hsv, mix, seeded_rng, shaded, smooth_noise, texture, to_image

# Canonical scene size: views crop and warp this picture, so it is larger than any view needs.
SCENE_W, SCENE_H = 1280, 960


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


# Every 8th landmark is a look-alike of the one before it (a hard negative pair).
TWIN_EVERY = 8


@dataclass(frozen=True)
class LandmarkSpec:
    """What makes one landmark: its structure family and the seeds of its geometry, colours, setting."""

    index: int
    family: str
    shape_seed: int
    colour_seed: int
    setting_seed: int
    twin_of: int | None = None


def landmark_specs(seed: int, n_landmarks: int) -> list[LandmarkSpec]:
    """The landmarks: structure families in turn, every TWIN_EVERY-th one a look-alike of the one before."""
    g = seeded_rng(seed, "families")
    order = [STRUCTURE_FAMILIES[i] for i in g.permutation(len(STRUCTURE_FAMILIES))]
    specs: list[LandmarkSpec] = []
    for i in range(n_landmarks):
        seeds = [int(x) for x in seeded_rng(seed, "landmark", i).integers(0, 2**62, 3)]
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
    return hsv(g.uniform(h0, h1), g.uniform(s0, s1), g.uniform(v0, v1))


def _make_palette(g: np.random.Generator) -> Palette:
    wall = _tone(g, WALL_TONES)
    wall2 = shaded(mix(wall, _tone(g, WALL_TONES), g.uniform(0.2, 0.6)), g.uniform(0.85, 1.1))
    roof = _tone(g, ROOF_TONES)
    wall_kind = ("stone", "brick", "plaster", "stripes", "flat")[g.integers(5)]
    wall2_kind = ("stone", "brick", "plaster", "glass")[g.integers(4)]
    roof_kind = ("tiles", "metal", "flat")[g.integers(3)]
    scale = float(g.uniform(6, 14))
    return Palette(
        wall=Material(wall_kind, wall, shaded(wall, g.uniform(0.6, 0.8)), scale),
        wall2=Material(wall2_kind, wall2, shaded(wall2, 0.65), float(g.uniform(6, 14))),
        roof=Material(roof_kind, roof, shaded(roof, 0.6), float(g.uniform(5, 10))),
        trim=shaded(wall, g.uniform(1.1, 1.3)) if g.random() < 0.6 else shaded(wall, 0.6),
        window=hsv(g.uniform(0.55, 0.65), g.uniform(0.1, 0.4), g.uniform(0.12, 0.35)),
        lit=hsv(g.uniform(0.1, 0.15), g.uniform(0.3, 0.6), g.uniform(0.85, 1.0)),
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
    L.rect((x0, top, x1, bottom), shaded(pal.wall.base, 0.45))
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
                L.line([(apex - half, y), (apex + half, y)], shaded(pal.wall.base, 0.8), 1)
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
    leg_color = shaded(pal.accent, 0.8)
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
    metal = Material("metal", pal.accent, shaded(pal.accent, 0.6), 8.0)
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
        top = hsv(g.uniform(0.56, 0.62), g.uniform(0.5, 0.75), g.uniform(0.7, 0.9))
        horizon = hsv(g.uniform(0.55, 0.6), g.uniform(0.15, 0.3), g.uniform(0.9, 1.0))
    elif kind == "hazy":
        top = hsv(g.uniform(0.55, 0.6), g.uniform(0.25, 0.4), g.uniform(0.8, 0.9))
        horizon = hsv(g.uniform(0.1, 0.15), g.uniform(0.05, 0.15), g.uniform(0.9, 1.0))
    elif kind == "overcast":
        v = g.uniform(0.6, 0.8)
        top, horizon = hsv(0.6, 0.05, v), hsv(0.6, 0.03, v + 0.12)
    else:
        top = hsv(g.uniform(0.6, 0.7), g.uniform(0.4, 0.6), g.uniform(0.45, 0.65))
        horizon = hsv(g.uniform(0.03, 0.1), g.uniform(0.5, 0.75), g.uniform(0.9, 1.0))
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
    haze = hsv(g.uniform(0.55, 0.65), g.uniform(0.1, 0.3), g.uniform(0.55, 0.75))
    if kind in ("hills", "mountains"):
        amplitude = H * (0.18 if kind == "mountains" else 0.07)
        xs = np.linspace(0, W, 40)
        ys = horizon - amplitude * (0.5 + 0.5 * smooth_noise(g, 40, 1, 5 if kind == "mountains" else 12)[0])
        color = haze if kind == "mountains" else hsv(g.uniform(0.22, 0.35), g.uniform(0.3, 0.5), g.uniform(0.35, 0.55))
        draw.polygon([(0, horizon + 2), *zip(xs, ys), (W, horizon + 2)], fill=color)
    elif kind == "city":
        x = 0.0
        while x < W:
            bw, bh = g.uniform(25, 90), g.uniform(20, 140)
            draw.rectangle((x, horizon - bh, x + bw, horizon + 2), fill=shaded(haze, g.uniform(0.9, 1.15)))
            x += bw + g.uniform(0, 15)
    elif kind == "trees":
        color = hsv(g.uniform(0.25, 0.38), g.uniform(0.35, 0.6), g.uniform(0.25, 0.45))
        for x in np.arange(-20, W + 20, 18):
            r = g.uniform(18, 40)
            draw.ellipse(
                (x - r, horizon - r * 1.6, x + r, horizon + r * 0.4), fill=shaded(color, g.uniform(0.85, 1.15))
            )
    else:
        draw.rectangle((0, horizon - H * 0.02, W, horizon + 2), fill=hsv(g.uniform(0.55, 0.6), 0.5, 0.55))


def _ground(image: Image.Image, g: np.random.Generator, gy: float, rng_tex: np.random.Generator) -> None:
    kind = ("grass", "plaza", "water", "sand", "road")[g.integers(5)]
    gh = H - int(gy)
    if kind == "grass":
        mat = Material("flat", hsv(g.uniform(0.22, 0.32), g.uniform(0.4, 0.65), g.uniform(0.4, 0.65)), (0, 0, 0))
    elif kind == "plaza":
        mat = Material("stone", hsv(g.uniform(0.05, 0.12), g.uniform(0.05, 0.25), g.uniform(0.55, 0.8)), (0, 0, 0), 10)
    elif kind == "water":
        mat = Material("flat", hsv(g.uniform(0.52, 0.6), g.uniform(0.4, 0.7), g.uniform(0.35, 0.6)), (0, 0, 0))
    elif kind == "sand":
        mat = Material("flat", hsv(g.uniform(0.1, 0.13), g.uniform(0.25, 0.45), g.uniform(0.75, 0.9)), (0, 0, 0))
    else:
        mat = Material("flat", hsv(0.6, 0.05, g.uniform(0.3, 0.45)), (0, 0, 0))
    tex = texture(mat, W, gh, rng_tex) * (1.0 + 0.1 * smooth_noise(rng_tex, W, gh, 30))[..., None]
    image.paste(to_image(tex), (0, int(gy)))
    draw = ImageDraw.Draw(image)
    vx = W * g.uniform(0.3, 0.7)
    if kind in ("plaza", "road"):  # lines converging on a vanishing point give depth
        for k in range(-12, 13):
            draw.line([(vx + k * 6, gy), (vx + k * 140, H)], fill=shaded(mat.base, 0.8), width=2)
        y = gy
        step = 6.0
        while y < H:
            draw.line([(0, y), (W, y)], fill=shaded(mat.base, 0.85), width=1)
            step *= 1.35
            y += step
    elif kind == "water":
        for _ in range(120):
            y = g.uniform(gy, H)
            x = g.uniform(0, W)
            length = g.uniform(20, 120) * (y - gy) / gh + 10
            draw.line([(x, y), (x + length, y)], fill=shaded(mat.base, g.uniform(1.15, 1.4)), width=2)


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
            green = hsv(g.uniform(0.22, 0.35), g.uniform(0.4, 0.7), g.uniform(0.25, 0.5))
            for _ in range(4):
                r = h * g.uniform(0.2, 0.35)
                ox, oy = g.uniform(-r, r) * 0.6, g.uniform(-h * 0.9, -h * 0.5)
                draw.ellipse(
                    (x + ox - r, base + oy - r, x + ox + r, base + oy + r), fill=shaded(green, g.uniform(0.85, 1.15))
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

    image = to_image(_sky(g_setting))
    _far_background(image, g_setting, gy)
    _ground(image, g_setting, gy, np.random.default_rng(spec.setting_seed + 1))
    layer = Layer((W, H), np.random.default_rng(spec.colour_seed + 1))
    FAMILY_DRAWERS[spec.family](layer, g_shape, palette, cx, gy)
    layer.composite_onto(image)
    bbox = layer.alpha.getbbox() or (0, 0, W, H)
    _side_props(image, g_setting, gy, (bbox[0], bbox[2]))
    return image, layer.alpha
