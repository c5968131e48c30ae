"""guidelab.morpho, Morpho-MNIST's morphometrics (Castro et al. 2019, Sec. 3): shapes drawn with a known width, height,
thickness, length, slant or area; the same shapes at two sizes; the input conventions; blank images; worker processes;
the reference code's pipeline written out with scikit-image's own functions; and what real MNIST digits are known to
look like."""

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage import morphology, transform

from guidelab import morpho
from guidelab.data import load_dataset
from guidelab.errors import GuidelabError


def render(inside, size: int = 28, sub: int = 8) -> np.ndarray:
    """A shape as a uint8 (size, size) image, white on black: each pixel's covered fraction (sub x sub samples).
    `inside(x, y)` takes coordinates in 28-px units (x the column, y the row, downwards), so one shape drawn at any size
    covers the same part of the canvas."""
    k = (np.arange(size * sub) + 0.5) / sub * (28 / size)
    x, y = np.meshgrid(k, k)
    cover = inside(x, y).reshape(size, sub, size, sub).mean((1, 3))
    return np.round(cover * 255).astype(np.uint8)


def stroke(x0, y0, x1, y1, t):
    """A pen stroke: the segment (x0, y0)-(x1, y1) (its path) drawn with a round pen of diameter t."""

    def inside(x, y):
        dx, dy = x1 - x0, y1 - y0
        a = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        return np.hypot(x - x0 - a * dx, y - y0 - a * dy) <= t / 2

    return inside


def centred_stroke(length, angle, t):
    """A straight stroke through the canvas centre, `angle` radians from vertical, leaning right for angle > 0."""
    dx, dy = length * np.sin(angle) / 2, length * np.cos(angle) / 2
    return stroke(14 - dx, 14 + dy, 14 + dx, 14 - dy, t)


def one(image: np.ndarray) -> dict[str, float]:
    return {name: float(v[0]) for name, v in morpho.measure(image[None], workers=1).items()}


def nine(x, y):
    """A 9: a ring on top of a slanted stem."""
    return (np.abs(np.hypot(x - 15, y - 10) - 4.5) <= 1.4) | stroke(19.3, 10, 15, 23, 2.8)(x, y)


def seven(x, y):
    return stroke(8, 6, 20, 6, 3)(x, y) | stroke(20, 6, 12, 23, 3)(x, y)


@pytest.fixture(scope="module")
def digits():
    """mnist5k's 500 test digits: uint8 (500, 28, 28), labels, their measurements."""
    data = load_dataset("mnist5k", "test")
    images = ((data.images[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    return images, data.labels.numpy(), morpho.measure(images, workers=1)


def test_the_names_and_units():
    assert morpho.ATTRIBUTES == ("area", "length", "thickness", "slant", "width", "height")
    assert set(morpho.UNITS) == set(morpho.ATTRIBUTES) and morpho.UNITS["slant"] == "rad"


@pytest.mark.parametrize("w, h", [(8, 20), (12, 16), (16, 8)])
def test_a_rectangle_has_its_width_and_height(w, h):
    """The parallelogram holds 98 % of the mass (0.98 w of a flat block) and the upsampling blurs the edges outwards:
    within 1 px of the drawn sides."""
    m = one(render(lambda x, y: (abs(x - 14) <= w / 2) & (abs(y - 14) <= h / 2)))
    assert abs(m["width"] - w) <= 1.0 and abs(m["height"] - h) <= 1.0, m
    assert abs(m["slant"]) < 1e-9


@pytest.mark.parametrize("t", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("angle", [0.0, 0.3, 0.9])
def test_a_stroke_has_its_pen_width_as_thickness(t, angle):
    m = one(render(centred_stroke(14, angle, t)))
    assert abs(m["thickness"] - t) <= 0.3, m


@pytest.mark.parametrize("ell", [10, 18])
@pytest.mark.parametrize("angle", [0.0, 0.3, 0.6, 0.9, 1.2, np.pi / 2])
def test_a_straight_line_has_its_length(ell, angle):
    """A thin straight stroke's skeleton runs along its path; its ends stop somewhere in the round caps."""
    m = one(render(centred_stroke(ell, angle, 2)))
    assert abs(m["length"] - ell) <= 2.0, m


@pytest.mark.parametrize("theta", [-0.4, -0.2, 0.0, 0.2, 0.4])
def test_a_sheared_bar_has_its_slant_with_the_sign_of_its_lean(theta):
    """A vertical bar sheared so that its top moves right by tan(theta) per unit of height: slant = theta exactly for
    the continuous shape (the shear is what arctan(-u11 / u02) reads), positive when it leans right; the sheared
    parallelogram keeps the bar's width and height."""
    shear = np.tan(theta)
    m = one(render(lambda x, y: (abs(x - 14 + shear * (y - 14)) <= 4) & (abs(y - 14) <= 9)))
    assert abs(m["slant"] - theta) <= 0.01, m
    assert abs(m["width"] - 8) <= 1.0 and abs(m["height"] - 18) <= 1.0, m
    leaning = one(render(centred_stroke(16, theta, 2)))["slant"]  # a thin line leaning by theta, too
    assert abs(leaning - theta) <= 0.02


@pytest.mark.parametrize("size", [28, 56])
@pytest.mark.parametrize("r", [4, 6, 9])
def test_a_disk_has_its_area(r, size):
    m = one(render(lambda x, y: (x - 14) ** 2 + (y - 14) ** 2 <= r * r, size))
    assert m["area"] == pytest.approx(np.pi * r * r, rel=0.03)


@pytest.mark.parametrize("shape", [nine, seven, centred_stroke(16, 0.3, 3)])
def test_the_same_shape_at_28_and_56_px_measures_the_same_in_28_px_units(shape):
    """Width and height may differ by up to one 28-px pixel: the upsampling's blur reaches about half an input pixel
    beyond each edge (a quarter of a 28-px pixel at 56 px), and on a thin stroke the 1 % tails of the mass lie in it."""
    at28, at56 = one(render(shape, 28)), one(render(shape, 56))
    assert at56["area"] == pytest.approx(at28["area"], rel=0.03)
    assert abs(at56["length"] - at28["length"]) <= 2.0
    assert abs(at56["thickness"] - at28["thickness"]) <= 0.2
    assert abs(at56["slant"] - at28["slant"]) <= 0.01
    assert abs(at56["width"] - at28["width"]) <= 1.0 and abs(at56["height"] - at28["height"]) <= 1.0


def test_floats_in_minus_one_one_and_uint8_tensors_and_arrays_measure_the_same():
    images = np.stack([render(nine), render(seven), render(centred_stroke(12, -0.2, 4))])
    floats = torch.from_numpy(images).float().div(127.5).sub(1.0)  # guidelab's convention: black -1, white 1
    expected = morpho.measure(images, workers=1)
    for same in (images[:, None], floats, floats[:, None], floats.numpy(), torch.from_numpy(images)):
        got = morpho.measure(same, workers=1)
        for name in morpho.ATTRIBUTES:
            np.testing.assert_array_equal(got[name], expected[name])
            assert got[name].dtype == np.float64 and got[name].shape == (3,)


def test_a_blank_image_gives_nan_where_undefined_and_does_not_raise():
    """Black, and a flat grey below the ink threshold (a threshold relative to each image's range would call it all
    ink): no stroke."""
    blank = torch.full((3, 1, 28, 28), -1.0)
    blank[1] = -0.3  # grey 89 of 255
    blank[2, 0, 10:18, 10:18] = 1.0  # one real square beside them
    m = morpho.measure(blank, workers=1)
    for i in (0, 1):
        assert m["area"][i] == 0 and m["length"][i] == 0
        assert all(np.isnan(m[name][i]) for name in ("thickness", "slant", "width", "height"))
    assert all(np.isfinite(m[name][2]) for name in morpho.ATTRIBUTES)
    assert all(v.shape == (0,) for v in morpho.measure(np.zeros((0, 28, 28), np.uint8)).values())


def test_one_and_two_worker_processes_give_identical_arrays(digits, monkeypatch):
    images = np.concatenate([digits[0][:10], np.zeros((1, 28, 28), np.uint8)])
    monkeypatch.setattr(morpho, "MIN_PER_WORKER", 1)  # use the pool even for 11 digits
    serial, parallel = morpho.measure(images, workers=1), morpho.measure(images, workers=2)
    for name in morpho.ATTRIBUTES:
        np.testing.assert_array_equal(parallel[name], serial[name])


def _reference_pipeline(image: np.ndarray) -> tuple[float, ...]:
    """The reference code's rules (morphomnist/morpho.py, measure.py) spelled out with scikit-image's own functions and
    plain loops, scale 112 / S: pyramid_expand, threshold 128, skeleton, the skeleton-length mask, raw moments, the
    bounding parallelogram's cumulative mass counted position by position."""
    scale = 112 / image.shape[0]
    up = (255.0 * transform.pyramid_expand(image, upscale=scale, order=3)).astype(np.uint8)
    ink = up >= 128
    skeleton, distance = morphology.skeletonize(ink), ndi.distance_transform_edt(ink)
    s = skeleton.astype(float)
    mask = np.array([[0, 0, 0], [0, 0, 1], [np.sqrt(2), 1, np.sqrt(2)]])
    length = (ndi.correlate(s, mask, mode="constant") * s).sum()
    g = up.astype(float)
    x, y = np.arange(g.shape[1])[None, :], np.arange(g.shape[0])[:, None]
    m = g.sum()
    mx, my = (x * g).sum() / m, (y * g).sum() / m
    shear = ((x * y * g).sum() / m - mx * my) / ((y**2 * g).sum() / m - my**2)
    across = [((x + 0.5 < t + shear * (y - my)) * g).sum() / m for t in range(g.shape[1])]
    down = [((y < t) * g).sum() / m for t in range(g.shape[0])]
    left, right = np.interp([0.01, 0.99], across, np.arange(g.shape[1]))
    top, bottom = np.interp([0.01, 0.99], down, np.arange(g.shape[0]))
    k = 28 / 112  # canvas pixels in 28-px units
    return (
        ink.sum() * k**2,
        length * k,
        2 * distance[skeleton].mean() * k,
        np.arctan(-shear),
        (right - left) * k,
        (bottom - top) * k,
    )


def test_the_fast_pipeline_is_the_reference_pipeline(digits):
    """Matrices for pyramid_expand, the skeleton on the ink's box, cumulative sums for the parallelogram: the same
    numbers, at 28 px (the reference's scale 4) and at 16 px (scale 7)."""
    small = torch.nn.functional.interpolate(torch.from_numpy(digits[0][:4, None]).float(), size=16, mode="bilinear")
    for image in [*digits[0][:6], *small[:, 0].round().to(torch.uint8).numpy()]:
        np.testing.assert_allclose(morpho.measure_one(image), _reference_pipeline(image), rtol=1e-9, atol=1e-9)


def test_real_digits_look_like_mnist(digits):
    """What is known of MNIST: strokes 1.5 to 4.5 px thick in every class; handwriting leans right on average; the 1s
    are the narrowest, smallest and shortest digits; every digit was fitted into a 20 x 20 px box (the 98 % height
    cannot pass 20 px by more than the upsampling's blur)."""
    _, labels, m = digits
    assert not any(np.isnan(v).any() for v in m.values())
    mean = {name: np.array([m[name][labels == c].mean() for c in range(10)]) for name in morpho.ATTRIBUTES}
    assert ((mean["thickness"] > 1.5) & (mean["thickness"] < 4.5)).all(), mean["thickness"]
    assert ((mean["slant"] > -0.2) & (mean["slant"] < 0.5)).all() and m["slant"].mean() > 0, mean["slant"]
    for name in ("width", "area", "length"):
        assert mean[name].argmin() == 1, (name, mean[name])
    assert m["height"].max() <= 21.0 and ((mean["height"] > 16) & (mean["height"] < 20.5)).all()


def test_a_mirrored_digit_has_the_opposite_slant(digits):
    images, _, m = digits
    mirrored = morpho.measure(images[:50, :, ::-1], workers=1)
    np.testing.assert_allclose(mirrored["slant"], -m["slant"][:50], atol=1e-6)
    for name in ("width", "height", "area"):
        np.testing.assert_allclose(mirrored[name], m[name][:50], atol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 3, 28, 28), np.uint8),  # colour
        np.zeros((2, 28, 20), np.uint8),  # not square
        np.zeros((28, 28), np.uint8),  # one image without its batch axis
        np.zeros((2, 28, 28), np.int64),  # an integer type other than uint8
        np.full((2, 28, 28), np.nan, np.float32),
    ],
)
def test_bad_input_is_refused_with_a_message(bad):
    with pytest.raises(GuidelabError, match="morpho"):
        morpho.measure(bad)


def test_workers_must_be_a_positive_integer():
    with pytest.raises(GuidelabError, match="workers"):
        morpho.measure(np.zeros((2, 28, 28), np.uint8), workers=0)
