"""Filters: Graham's local-average subtraction, CLAHE, composition, on real photos."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.filters import FilterParams, _gaussian_blur, available, get_filter
from pipeline.process import ProcessConfig, prepare


@pytest.fixture(scope="module")
def squares(sample_photos):
    """(square, radius, frame) for a few real photos, unfiltered."""
    from pipeline import decode as dec
    from pipeline.retina import crop_to_retina, find_retina

    out = []
    for p in sample_photos[::6]:
        data = p.read_bytes()
        info = dec.read_info(data)
        img = dec.decode(data, info, dec.choose_dct_factor(min(info.width, info.height), 512))
        crop = crop_to_retina(img, find_retina(img), 512)
        out.append((crop.image, crop.radius, crop.frame))
    return out


def test_registry_names():
    assert {"none", "graham", "clahe"} <= set(available())
    with pytest.raises(ValueError, match="unknown filter 'gram'"):
        get_filter("graham+gram")


def test_none_is_identity(squares):
    img, r, frame = squares[0]
    assert get_filter("none")(img, r, frame) is img


def test_graham_matches_the_reference_formula(squares):
    """Inside the disc and away from clipped edges, ours equals TFDS's formula
    (4*img - 4*blur(sigma=r/30) + 128) up to the half-resolution blur (<= 4 levels)."""
    img, r, frame = squares[1]
    ours = get_filter("graham")(img, r, frame).astype(int)
    ref = cv2.addWeighted(img, 4, cv2.GaussianBlur(img, (0, 0), r / 30), -4, 128).astype(int)
    inner = np.zeros(img.shape[:2], np.uint8)
    cv2.circle(inner, (256, 256), int(0.8 * r), 1, -1)
    x0, y0, x1, y1 = frame
    inner[: y0 + 40] = 0
    inner[max(y1 - 40, 0):] = 0
    d = np.abs(ours - ref)[inner.astype(bool)]
    assert d.max() <= 4 and d.mean() < 1.0


def test_graham_background_outside_90_percent_and_in_padding(squares):
    for img, r, frame in squares:
        out = get_filter("graham")(img, r, frame)
        yy, xx = np.mgrid[0:512, 0:512]
        outside = np.hypot(xx - 256, yy - 256) > 0.9 * r + 1.5
        assert (out[outside] == 128).all()
        x0, y0, x1, y1 = frame
        assert (out[:y0] == 128).all() and (out[y1:] == 128).all()


def test_graham_has_no_bright_band_at_clipped_edges(squares):
    """The reference averages the black padding in and leaves a bright band along every
    clipped edge; ours must look like the rest of the disc there."""
    clipped = [(img, r, f) for img, r, f in squares if f[1] > 10]
    assert clipped, "the sample has photos clipped at top and bottom"
    for img, r, (x0, y0, x1, y1) in clipped:
        out = get_filter("graham")(img, r, (x0, y0, x1, y1)).astype(float)
        band = out[y0 + 2:y0 + 14, 200:312].mean()
        middle = out[240:272, 200:312].mean()
        assert abs(band - middle) < 12, (band, middle)
        ref = cv2.addWeighted(img, 4, cv2.GaussianBlur(img, (0, 0), r / 30), -4, 128)
        assert ref[y0 + 2:y0 + 14, 200:312].mean() - middle > 20  # the artefact we avoid


def test_half_resolution_blur_is_within_one_level(squares):
    img, r, _ = squares[0]
    sigma = r / 30
    full = cv2.GaussianBlur(img, (0, 0), sigma).astype(int)
    fast = _gaussian_blur(img, sigma).astype(int)
    disc = np.zeros(img.shape[:2], np.uint8)
    cv2.circle(disc, (256, 256), int(0.9 * r), 1, -1)
    d = np.abs(full - fast)[disc.astype(bool)]
    assert d.max() <= 1 and d.mean() < 0.3


def test_clahe_raises_local_contrast_and_keeps_hue(squares):
    img, r, frame = squares[2]
    out = get_filter("clahe", FilterParams(clahe_clip=3.0, clahe_tiles=8))(img, r, frame)
    lab_in = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(float)
    lab_out = cv2.cvtColor(out, cv2.COLOR_RGB2LAB).astype(float)
    disc = np.zeros(img.shape[:2], np.uint8)
    cv2.circle(disc, (256, 256), int(0.8 * r), 1, -1)
    m = disc.astype(bool)

    def local_std(L):
        mu = cv2.blur(L, (15, 15))
        return np.sqrt(np.maximum(cv2.blur(L * L, (15, 15)) - mu * mu, 0))[m].mean()

    assert local_std(lab_out[:, :, 0]) > 1.3 * local_std(lab_in[:, :, 0])
    assert np.abs(lab_out[:, :, 1:][m] - lab_in[:, :, 1:][m]).mean() < 3  # a, b kept


def test_clahe_parameters_change_the_output(squares):
    img, r, frame = squares[0]
    a = get_filter("clahe", FilterParams(clahe_clip=1.0))(img, r, frame)
    b = get_filter("clahe", FilterParams(clahe_clip=4.0))(img, r, frame)
    assert np.abs(a.astype(int) - b).mean() > 1


def test_composition_applies_left_to_right(squares):
    img, r, frame = squares[0]
    both = get_filter("graham+clahe")(img, r, frame)
    manual = get_filter("clahe")(get_filter("graham")(img, r, frame), r, frame)
    assert np.array_equal(both, manual)
    assert not np.array_equal(both, get_filter("clahe+graham")(img, r, frame))


@pytest.mark.parametrize("spec", ["none", "graham", "clahe", "graham+clahe"])
def test_every_filter_runs_end_to_end(sample_photos, spec):
    p = prepare(sample_photos[3].read_bytes(), ProcessConfig(size=256, filter=spec))
    assert p.image.shape == (256, 256, 3) and p.image.dtype == np.uint8
