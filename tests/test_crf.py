"""Tests of seam_nb.crf: per-pixel distributions, boundaries pulled onto colour edges, input errors, a real VOC image."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip('pydensecrf.densecrf')
from seam_nb.core import SeamError
from seam_nb.crf import dense_crf, crf_with_alpha, crf_label

SHARED = Path(__file__).resolve().parents[1].parent/'shared'
VOC = SHARED/'voc_sample'


def two_region(h=40, w=60, edge=30, shift=6, seed=0):
    "Left half red, right half blue; 2-label scores whose boundary sits `shift` px away from the colour edge."
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3)); img[:, :edge] = (210, 30, 30); img[:, edge:] = (30, 30, 210)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    x = np.arange(w)[None].repeat(h, 0)
    p_right = np.where(x >= edge + shift, 0.75, 0.25)
    return img, np.stack([1 - p_right, p_right]).astype(np.float32), (x >= edge).astype(np.int64)


def test_output_is_a_distribution():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    probs = rng.random((5, 20, 24)).astype(np.float32)
    q = dense_crf(img, probs)
    assert q.shape == (5, 20, 24) and q.dtype == np.float32
    assert np.allclose(q.sum(0), 1, atol=1e-4) and (q >= 0).all()
    # non-contiguous / float64 inputs are accepted too
    q2 = dense_crf(np.asfortranarray(img), probs.astype(np.float64)[:, :, :])
    assert np.allclose(q, q2, atol=1e-5)


@pytest.mark.parametrize('shift', [-7, -4, 4, 7])
def test_boundary_moves_to_colour_edge(shift):
    img, probs, truth = two_region(shift=shift)
    correct_before = (probs.argmax(0) == truth).sum()
    correct_after = (dense_crf(img, probs).argmax(0) == truth).sum()
    assert correct_after > correct_before
    assert correct_after >= 0.99 * truth.size


def test_crf_with_alpha_keys_and_background():
    img, probs, truth = two_region(shift=-5)
    cams = {3: probs[1] * 0.9, 11: np.zeros_like(probs[1])}
    out = crf_with_alpha(img, cams, alpha=4)
    assert sorted(out) == [0, 3, 11]
    assert np.allclose(out[0] + out[3] + out[11], 1, atol=1e-4)
    lab = crf_label(img, cams, alpha=4)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 3, 11}
    assert ((lab == 3) == (truth == 1)).mean() > ((probs[1] * 0.9 > 0.26) == (truth == 1)).mean()
    # a larger alpha shrinks the background: never less foreground
    assert (crf_label(img, cams, alpha=24) == 3).sum() >= (lab == 3).sum()
    assert (crf_label(img, {}) == 0).all()


def test_input_errors():
    img, probs, _ = two_region()
    with pytest.raises(SeamError, match='uint8'): dense_crf(img.astype(np.float32), probs)
    with pytest.raises(SeamError, match=r'\[H, W, 3\]'): dense_crf(img[..., :2], probs)
    with pytest.raises(SeamError, match=r'\[H, W, 3\]'): dense_crf(img[..., 0], probs)
    with pytest.raises(SeamError, match='numpy array'): dense_crf(img.tolist(), probs)
    with pytest.raises(SeamError, match=r'\[C, H, W\]'): dense_crf(img, probs[0])
    with pytest.raises(SeamError, match='60x40'): dense_crf(img, probs[:, :, :50])
    with pytest.raises(SeamError, match='non-negative'): dense_crf(img, -probs)
    with pytest.raises(SeamError, match='finite'): dense_crf(img, np.full_like(probs, np.nan))
    with pytest.raises(SeamError, match='n_iters'): dense_crf(img, probs, n_iters=-1)
    with pytest.raises(SeamError, match='60x40'): crf_with_alpha(img, {1: probs[1][:20]})
    with pytest.raises(SeamError, match='>= 1'): crf_with_alpha(img, {0: probs[1]})


def test_real_voc_image_improves():
    if not (VOC/'JPEGImages').is_dir(): pytest.skip('../shared/voc_sample is absent')
    name = '2007_000032'   # aeroplane + person
    img = np.array(Image.open(VOC/'JPEGImages'/f'{name}.jpg').convert('RGB'))
    gt = np.array(Image.open(VOC/'SegmentationClass'/f'{name}.png'))
    img, gt = img[::2, ::2].copy(), gt[::2, ::2].copy()           # half size keeps the test quick
    # a CAM-like guess: each object's mask, shifted by 6 px and softened
    cams = {}
    for k in (1, 15):
        m = np.roll((gt == k).astype(np.float32), (6, 6), (0, 1))
        for _ in range(3): m = (m + np.roll(m, 1, 0) + np.roll(m, -1, 0) + np.roll(m, 1, 1) + np.roll(m, -1, 1)) / 5
        cams[k] = m / m.max()
    valid = gt != 255
    fg = np.max(list(cams.values()), 0)
    before = np.where(fg > 0.26, np.array([1, 15])[np.argmax(list(cams.values()), 0)], 0)
    after = crf_label(img, cams, alpha=4)
    assert (after == gt)[valid].mean() > (before == gt)[valid].mean()


def test_read_only_image_is_accepted():
    "Arrays made from PIL images are read-only; pydensecrf needs a writable buffer, so dense_crf copies when needed."
    img = np.zeros((8, 8, 3), np.uint8); img.setflags(write=False)
    out = dense_crf(img, np.full((2, 8, 8), .5, np.float32))
    np.testing.assert_allclose(out.sum(0), 1, atol=1e-3)
