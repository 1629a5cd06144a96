"""Geometric verification (landmarks.verify) on synthetic textured images: a second view of the same
scene (perspective warp, scale, brightness) has many RANSAC inliers, an unrelated scene few."""

import math

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from landmarks.common import StageError
from landmarks.verify import (
    EMPTY,
    MODELS,
    VerifySettings,
    count_inliers,
    extract,
    inliers,
    is_missing,
    match,
    verify_neighbours,
)

SETTINGS = VerifySettings()


def scene(seed: int, size=(400, 300)) -> Image.Image:
    """A textured RGB picture: random shapes of random colours over blurred noise."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(120):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        w, h = rng.integers(4, 40, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = (draw.ellipse, draw.rectangle)[int(rng.integers(2))]
        shape([x, y, x + w, y + h], fill=colour, outline=(0, 0, 0))
    return image.filter(ImageFilter.GaussianBlur(0.7))


def second_view(image: Image.Image) -> np.ndarray:
    """The same scene seen from elsewhere: perspective warp, 0.8x scale, darker and lower contrast."""
    w, h = image.size
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    moved = np.float32([[30, 20], [w * 0.8 - 10, 5], [w * 0.8 + 5, h * 0.8 + 10], [10, h * 0.8 - 15]])
    warped = cv2.warpPerspective(
        np.asarray(image),
        cv2.getPerspectiveTransform(corners, moved),
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderValue=(90, 90, 90),
    )
    return np.clip(warped.astype(np.float32) * 0.7 + 25, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def views():
    return {"a": scene(1), "a2": second_view(scene(1)), "b": scene(2)}


@pytest.fixture(scope="module")
def features(views):
    return {name: extract(image, SETTINGS) for name, image in views.items()}


def test_second_view_has_many_inliers_unrelated_scene_few(features):
    same = count_inliers(features["a"], features["a2"], SETTINGS)
    unrelated = count_inliers(features["a"], features["b"], SETTINGS)
    assert same >= 4 * SETTINGS.min_inliers, (same, unrelated)
    assert unrelated < SETTINGS.min_inliers, (same, unrelated)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_separates_and_is_reproducible(features, model):
    settings = VerifySettings(model=model)
    same = [count_inliers(features["a"], features["a2"], settings) for _ in range(3)]
    unrelated = count_inliers(features["a"], features["b"], settings)
    assert same[0] == same[1] == same[2]
    assert same[0] > 2 * max(unrelated, settings.min_inliers), (model, same, unrelated)


def with_watermark(image: Image.Image) -> Image.Image:
    """The picture with a stock-agency strip along its bottom: a textured logo and text, always at the same spot."""
    marked = image.copy()
    w, h = marked.size
    marked.paste(scene(99, size=(110, 36)), (6, h - 40))
    draw = ImageDraw.Draw(marked)
    draw.rectangle([120, h - 40, w, h], fill=(10, 10, 10))
    for row in range(3):
        draw.text((126, h - 38 + 12 * row), f"Image ID: 2X{row}R4K7 www.agency.example", fill=(240, 240, 240))
    return marked


def test_a_watermark_both_photos_carry_does_not_verify_them(views):
    marked = [extract(with_watermark(scene(seed)), SETTINGS) for seed in (1, 2)]
    counting_static = VerifySettings(ignore_static=False)
    assert count_inliers(*marked, counting_static) >= SETTINGS.min_inliers  # the overlay alone would verify
    assert count_inliers(*marked, SETTINGS) < SETTINGS.min_inliers
    # the same place still verifies through the overlay, and an exact copy (all matches in place) too
    same_place = [extract(with_watermark(scene(1))), extract(with_watermark(Image.fromarray(second_view(scene(1)))))]
    assert count_inliers(*same_place, SETTINGS) >= 2 * SETTINGS.min_inliers
    assert count_inliers(marked[0], marked[0], SETTINGS) >= 4 * SETTINGS.min_inliers


def test_ignoring_static_matches_leaves_a_second_view_alone(features):
    # Only the few points the warp happens to leave in place go (RANSAC then draws other samples).
    kept = count_inliers(features["a"], features["a2"], SETTINGS)
    everything = count_inliers(features["a"], features["a2"], VerifySettings(ignore_static=False))
    assert abs(kept - everything) <= 0.05 * everything, (kept, everything)


def test_features_respect_max_side_and_max_features(views):
    big = views["a"].resize((1600, 1200))
    small = extract(big, VerifySettings(max_side=300, max_features=50))
    assert 0 < len(small) <= 50 and small.descriptors.shape == (len(small), 128)
    assert small.xy.dtype == np.float32 and small.xy.max() < 300


def test_the_schema_and_verify_settings_share_their_defaults():
    # retrieve passes the schema's values; the tests here use VerifySettings(): both must be what runs.
    from dataclasses import fields

    from landmarks.config import section_settings

    schema = section_settings("retrieve", {}, "defaults")["verify"]
    shared = [f.name for f in fields(VerifySettings) if f.name in schema]
    assert {"max_side", "min_inliers", "ratio", "model", "ignore_static"} <= set(shared)
    assert {name: schema[name] for name in shared} == {name: getattr(SETTINGS, name) for name in shared}


def test_a_384_px_shard_is_verified_at_224_px_where_min_inliers_holds(views):
    # Training's 384-px shards would give SIFT 384 px and more chance inliers between other places.
    shard = views["a"].resize((384, 288))
    features = extract(shard, SETTINGS)
    assert SETTINGS.max_side == 224 and 0 < features.xy.max() < 224


def test_blank_tiny_and_odd_images_give_no_inliers(features):
    odd = [
        Image.new("RGB", (300, 200), (120, 120, 120)),
        Image.new("L", (3, 2)),
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((1, 1), np.uint8),
        np.full((50, 80, 4), 255, np.uint8),
    ]
    for image in odd:
        empty = extract(image, SETTINGS)
        assert len(empty) == 0
        assert count_inliers(empty, features["a"], SETTINGS) == 0
        assert count_inliers(features["a"], empty, SETTINGS) == 0


def test_colour_modes_and_array_types_give_the_same_features(views):
    rgb = views["a"]
    reference = extract(rgb, SETTINGS)
    array = np.asarray(rgb)
    rgba = np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=2)
    for same in (rgb.convert("RGBA"), rgb.convert("L"), rgba, array, array.astype(np.float32) / 255):
        other = extract(same, SETTINGS)
        assert count_inliers(reference, other, SETTINGS) > 0.8 * len(reference)


def test_too_few_matches_give_zero():
    points = np.float32([[0, 0], [10, 0], [0, 10]])
    assert inliers(points, points, VerifySettings(model="homography")) == 0  # a homography needs 4
    assert inliers(points, points, VerifySettings(model="affine")) == 3
    collinear = np.float32([[i, 2 * i] for i in range(10)])
    assert inliers(collinear, collinear, VerifySettings(model="fundamental")) >= 0  # no error


def test_mutual_matching_is_one_to_one(features):
    pairs = match(features["a"], features["a2"], VerifySettings(ratio=1.0, mutual=True))
    assert len(np.unique(pairs[:, 1])) == len(pairs) > 0
    assert len(match(EMPTY, features["a"], SETTINGS)) == 0


def test_rootsift_and_ratio_change_the_matches(features):
    loose = match(features["a"], features["a2"], VerifySettings(ratio=0.9))
    strict = match(features["a"], features["a2"], VerifySettings(ratio=0.6))
    plain = match(features["a"], features["a2"], VerifySettings(rootsift=False))
    assert 0 < len(strict) < len(loose) and len(plain) > 0


def test_settings_are_checked():
    for bad in (dict(model="similarity"), dict(ratio=0.0), dict(max_side=4)):
        with pytest.raises(StageError):
            VerifySettings(**bad)


def test_missing_neighbours():
    assert all(map(is_missing, [-1, None, float("nan"), np.int64(-1)]))
    assert not any(map(is_missing, [0, "x", "-1", np.int64(3)]))


def test_verify_neighbours_loads_each_image_once_and_skips_missing(views):
    images = {"q1": views["a"], "q2": views["b"], "q3": views["a"], "d1": views["a2"], "d2": views["b"]}
    calls = []

    def load_image(identifier):
        calls.append(identifier)
        return images[identifier]

    neighbours = np.array([["d1", "d2", -1], ["d2", None, "d1"], [-1, None, math.nan]], dtype=object)
    counts = verify_neighbours(["q1", "q2", "q3"], neighbours, load_image, SETTINGS, threads=2, progress=False)
    assert sorted(calls) == ["d1", "d2", "q1", "q2"]  # q3 has no neighbour: never loaded
    assert counts.shape == (3, 3) and counts.dtype == np.int32
    assert counts[0, 0] >= 4 * SETTINGS.min_inliers and counts[0, 1] < SETTINGS.min_inliers
    assert counts[1, 0] > 4 * SETTINGS.min_inliers  # the same picture
    assert counts[0, 2] == counts[1, 1] == 0 and not counts[2].any()
    again = verify_neighbours(["q1", "q2", "q3"], neighbours, images.__getitem__, SETTINGS, threads=1, progress=False)
    np.testing.assert_array_equal(counts, again)  # threads do not change the counts


def test_verify_neighbours_checks_its_shapes(views):
    with pytest.raises(StageError):
        verify_neighbours(["q1"], np.array(["d1", "d2"], dtype=object), lambda _: views["a"], progress=False)
    assert verify_neighbours([], np.zeros((0, 5), object), lambda _: views["a"], progress=False).shape == (0, 5)
