"""Drawing primitives every demo picture is made of: seeded random streams, colour helpers, value noise,
surface textures (Material) and the RGBA Layer that landmark structures are painted on."""

from __future__ import annotations

import colorsys
import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------
# Deterministic randomness and colours
# ---------------------------------------------------------------------------------------------


def seeded_rng(seed: int, tag: str, *keys: int) -> np.random.Generator:
    """An independent generator per (seed, purpose, index): results never depend on task order."""
    return np.random.default_rng([seed, zlib.crc32(tag.encode()), *keys])


def hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    """An RGB colour (0-255) from hue (wraps around), saturation and value (clipped to [0, 1])."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5)


def shaded(color, factor: float) -> tuple[int, int, int]:
    """`color` darkened (factor < 1) or lightened (factor > 1), clipped to 0-255."""
    return tuple(int(min(255, max(0, c * factor))) for c in color[:3])


def mix(a, b, t: float) -> tuple[int, int, int]:
    """The colour a fraction `t` of the way from `a` to `b`."""
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a[:3], b[:3]))


def smooth_noise(rng: np.random.Generator, w: int, h: int, cell: float) -> np.ndarray:
    """Value noise in about [-1, 1]: a coarse random grid upsampled smoothly; `cell` is its period."""
    gw, gh = max(2, int(w / cell) + 2), max(2, int(h / cell) + 2)
    grid = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)


def to_image(arr: np.ndarray) -> Image.Image:
    """An RGB image from a float h x w x 3 array, clipped to 0-255."""
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


def texture(material: Material, w: int, h: int, rng: np.random.Generator, grain=None) -> np.ndarray:
    """A h x w x 3 float texture, aligned to the canvas so neighbouring shapes continue it.

    `grain` (h x w, around 1) is fine noise shared by the materials of one picture.
    """
    base = np.array(material.base, np.float32)
    accent = np.array(material.accent, np.float32)
    # Coordinates as a column and a row: numpy broadcasts them, which is much cheaper than a grid.
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    if grain is None:
        grain = 1.0 + 0.05 * smooth_noise(rng, w, h, 5.0)
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
        streak = 1.0 + 0.05 * smooth_noise(rng, w, h, 3 * s) + 0.03 * np.sin(xx / 2.5)
        return base * (streak * grain)[..., None]
    if material.kind == "stone":
        blocks = (1.0 + 0.08 * smooth_noise(rng, w, h, 4 * s)) * grain
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
                self._grain = 1.0 + 0.05 * smooth_noise(self._rng, w, h, 5.0)
            self._textures[material] = to_image(texture(material, w, h, self._rng, self._grain))
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
            self.rgb.paste(shaded(paint, shade), box, mask)
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
