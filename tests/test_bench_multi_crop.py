"""bench/multi_crop.py: several crops of each photo, as bench/real_photos.md reports them."""

import numpy as np
import torch
from conftest import load_bench_script
from PIL import Image

from landmarks.loader import eval_transform

multi_crop = load_bench_script("multi_crop")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def wide_photo() -> Image.Image:
    """300 x 100: a red left third, a green middle, a blue right third."""
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, :100] = (255, 0, 0)
    pixels[:, 100:200] = (0, 255, 0)
    pixels[:, 200:] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_the_centre_view_is_what_embed_stores_and_the_end_views_show_the_ends_of_the_longer_side():
    photo = wide_photo()
    views = multi_crop.CropViews(50, MEAN, STD)(photo)
    assert [tuple(view.shape) for view in views] == [(3, 50, 50)] * len(multi_crop.VIEWS)
    torch.testing.assert_close(views[0], eval_transform(50, MEAN, STD)(photo))  # the stored embedding's input
    red, blue = (1 - 0.5) / 0.25, (1 - 0.5) / 0.25
    start, end = multi_crop.VIEWS.index("start"), multi_crop.VIEWS.index("end")
    assert views[start][0].mean() > 0.9 * red and views[start][2].mean() < 0  # the left end: red
    assert views[end][2].mean() > 0.9 * blue and views[end][0].mean() < 0  # the right end: blue
    tall = multi_crop.CropViews(50, MEAN, STD)(photo.transpose(Image.Transpose.ROTATE_90))
    assert tall[start][2].mean() > 0.9 * blue  # rotated left, the blue end is on top


def test_a_query_whose_landmark_fills_only_one_end_is_answered_through_that_view():
    # Views: centre, start, end, zoom (unit vectors). The query's centre looks like landmark 2's photo, its
    # right end exactly like landmark 1's photo.
    queries = np.array([[[0.6, 0.8, 0], [0, 0, 1], [1, 0, 0], [0.6, 0.8, 0]]])
    db = np.array([[[1, 0, 0]] * 4, [[0, 1, 0]] * 4], dtype=float)
    cosines = multi_crop.settings(queries, db)
    assert cosines["plain"].argmax(axis=1).tolist() == [1]  # centre to centre: landmark 2
    assert cosines["query_max"].argmax(axis=1).tolist() == [0]  # the end view matches landmark 1 at cosine 1
    np.testing.assert_allclose(cosines["query_max"], [[1.0, 0.8]])
    mean = multi_crop.normalise(queries.mean(axis=1))
    np.testing.assert_allclose(cosines["query_mean"], mean @ db[:, 0].T)
