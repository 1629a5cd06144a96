"""Taking photos of a landmark scene: the viewpoint (a perspective window around the structure),
relighting, things in front of the landmark, blur and sensor noise. `photograph` is one random view."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageStat

from .canvas import hsv, shaded, to_image
from .scenes import SCENE_H, SCENE_W, LandmarkSpec, render_landmark

W, H = SCENE_W, SCENE_H

# Output shapes (width:height) of the photos, as cameras and phones produce them.
ASPECTS = ((4, 3), (3, 4), (16, 9), (9, 16), (1, 1), (2, 1), (3, 2), (2, 3))
LONG_SIDE = (200, 900)


def output_size(g: np.random.Generator) -> tuple[int, int]:
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


def relight(image: Image.Image, g: np.random.Generator, strength: float = 1.0) -> Image.Image:
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
        image = Image.blend(image, Image.new("RGB", image.size, hsv(0.58, 0.08, 0.9)), 0.25)
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
        color = hsv(g.uniform(0, 1), g.uniform(0.2, 0.8), g.uniform(0.15, 0.8))
        if kind == "person":
            ph = h * g.uniform(0.15, 0.45)
            bw = ph * 0.28
            draw.rounded_rectangle((x - bw / 2, base - ph * 0.82, x + bw / 2, base), radius=bw * 0.3, fill=color)
            skin = hsv(g.uniform(0.04, 0.09), g.uniform(0.3, 0.6), g.uniform(0.35, 0.9))
            draw.ellipse((x - bw * 0.3, base - ph, x + bw * 0.3, base - ph * 0.8), fill=skin)
        elif kind == "tree":
            th = h * g.uniform(0.3, 0.7)
            x = g.uniform(0, w * 0.15) if g.random() < 0.5 else g.uniform(w * 0.85, w)
            draw.rectangle((x - th * 0.03, base - th * 0.6, x + th * 0.03, base), fill=(70, 52, 35))
            green = hsv(g.uniform(0.22, 0.35), g.uniform(0.4, 0.7), g.uniform(0.2, 0.5))
            for _ in range(5):
                r = th * g.uniform(0.15, 0.28)
                ox, oy = g.uniform(-r, r), g.uniform(-th, -th * 0.55)
                draw.ellipse(
                    (x + ox - r, base + oy - r, x + ox + r, base + oy + r), fill=shaded(green, g.uniform(0.8, 1.2))
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
                fill=shaded(color, 0.8),
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
        image.paste(hsv(0.05, 0.45, 0.45), (0, 0, w, h), blob)


def camera_noise(image: Image.Image, g: np.random.Generator) -> Image.Image:
    if g.random() < 0.35:
        image = image.filter(ImageFilter.GaussianBlur(g.uniform(0.4, 1.8)))
    if g.random() < 0.3:  # sensor noise, the same in all channels
        sigma = g.uniform(2, 7)
        noise = g.standard_normal((image.size[1], image.size[0], 1), dtype=np.float32) * sigma
        image = to_image(np.asarray(image, np.float32) + noise)
    return image


class Scene:
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


def photograph(scene: Scene, g: np.random.Generator) -> Image.Image:
    """One upright RGB photo of a scene from a random viewpoint."""
    out_size = output_size(g)
    quad = _view_quad(g, scene.bbox, scene.structure_points, out_size)
    # Pre-shrink the source for strong downscaling: PERSPECTIVE resampling does not antialias.
    factor = int(min(4, max(1, np.linalg.norm(quad[1] - quad[0]) / out_size[0] // 1.5)))
    source = scene.reduced(factor)
    coeffs = _perspective_coefficients(out_size, [tuple(p / factor) for p in quad])
    image = source.transform(out_size, Image.PERSPECTIVE, coeffs, Image.BILINEAR)
    image = relight(image, g)
    _occlude(image, g)
    return camera_noise(image, g)
