"""bench/neighbour_smoothing.py: database-side augmentation and query expansion, as the README reports them."""

import numpy as np
from test_bench_method import load

smoothing = load("neighbour_smoothing")


def unit(*vectors) -> np.ndarray:
    return smoothing.normalise(np.array(vectors, dtype=np.float64))


def test_dba_pulls_each_image_towards_its_nearest_neighbour_by_cosine_cubed():
    db = unit([1, 0, 0], [0.8, 0.6, 0], [0, 0, 1])
    labels = np.array([1, 1, 2])
    assert smoothing.augment_database(db, labels, 0, False) is db  # k = 0: the plain database
    augmented = smoothing.augment_database(db, labels, 1, False)
    expected = smoothing.normalise(db[:1] + 0.8**3 * db[1:2])  # image 0's nearest is image 1, cosine 0.8
    np.testing.assert_allclose(augmented[0], expected[0])
    np.testing.assert_allclose(augmented[2], db[2])  # its nearest is orthogonal: weight 0


def test_same_landmark_dba_never_mixes_two_landmarks():
    db = unit([1, 0, 0], [0.9, 0.1, 0], [0.5, 0, 0.5])
    labels = np.array([1, 2, 1])
    augmented = smoothing.augment_database(db, labels, 1, True)
    np.testing.assert_allclose(augmented[:2], db[:2])  # each one's nearest is of the other landmark
    plain = smoothing.augment_database(db, labels, 1, False)
    assert not np.allclose(plain[0], db[0])


def test_query_expansion_moves_the_query_towards_its_nearest_database_images():
    db = unit([1, 0], [0.6, 0.8], [0.55, 0.835])
    labels = np.array([7, 8, 8])
    query = unit([0.8, 0.6])  # cosine 0.8 to the landmark 7 image, 0.96 and 0.94 to the landmark 8 ones
    label, score = smoothing.predict(db, labels, query, qe=0)
    assert label[0] == 8 and np.isclose(score[0], 0.96)
    label, score = smoothing.predict(db, labels, query, qe=2)  # expanded towards landmark 8: closer still
    assert label[0] == 8 and score[0] > 0.96
