"""Tests of seam_nb.crf: per-pixel distributions, boundaries pulled onto colour edges, input errors, a real VOC image,
the CRF stage over an inference folder (`crf_stage`, resumable, sharded) and its `seam_nb_crf` command."""
import os, subprocess, sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip('pydensecrf.densecrf')
import torch
from seam_nb.core import SeamError, torch_save_atomic, load_cam_npz
from seam_nb.crf import dense_crf, crf_with_alpha, crf_label, crf_stage, main as crf_main

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


# --- the CRF stage over an inference folder (CRF used to be part of seam_nb.infer) -------------------------------
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}


@pytest.fixture(scope='module')
def infer_dir(tmp_path_factory):
    "A seam_nb_infer folder (console script, so infer_config.json is written) of 3 Shapes images, random tiny SEAMNet."
    from seam_nb.model import SEAMNet
    from seam_nb.train import make_config
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp('crf')
    cfg = asdict(make_config('shapes_cpu', n_images=3, image_size=64))
    torch_save_atomic({'model': SEAMNet('tiny', num_classes=7).state_dict(), 'config': cfg, 'step': 0}, root/'last.pt')
    r = subprocess.run(['seam_nb_infer', '--ckpt', str(root/'last.pt'), '--dataset', 'shapes', '--n-images', '3',
                        '--scales', '1', '--out', str(root/'infer'), '--no-progress', '--device', 'cpu'],
                       capture_output=True, text=True, env=ENV, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    return root/'infer'


def test_crf_stage_writes_resumes_and_shards(infer_dir, tmp_path):
    from seam_nb.shapes import ShapesSource
    src = ShapesSource(3, 64)
    assert sorted(p.stem for p in (infer_dir/'pcm').glob('*.npz')) == sorted(src.names)
    res = crf_stage(src, infer_dir/'pcm', tmp_path, progress=False)
    assert res == {'written': 3, 'skipped': 0, 'total': 3}
    for a in (4, 24):
        for n in src.names:
            im = Image.open(tmp_path/f'label_crf_{a}'/f'{n}.png')
            assert im.mode == 'P' and im.size == (64, 64)
            assert set(np.unique(np.asarray(im))) <= {0} | {int(k) + 1 for k in np.flatnonzero(src.labels(n))}
            q = load_cam_npz(tmp_path/f'crf_{a}'/f'{n}.npz', background=True)          # the scores behind the labels
            assert list(q)[0] == 0 and np.allclose(sum(q.values()), 1, atol=5e-3)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*.png')}
    assert crf_stage(src, infer_dir/'pcm', tmp_path, progress=False) == {'written': 0, 'skipped': 3, 'total': 3}
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*.png')}
    (tmp_path/'label_crf_24'/f'{src.names[1]}.png').unlink()                # one missing label: only that image is redone
    assert crf_stage(src, infer_dir/'pcm', tmp_path, progress=False)['written'] == 1
    # shards: disjoint, covering every name; other alphas get their own folders
    got = [crf_stage(src, infer_dir/'pcm', tmp_path/'sh', alphas=(8,), rank=r, world_size=2, progress=False) for r in (0, 1)]
    assert [g['total'] for g in got] == [2, 1]
    assert sorted(p.stem for p in (tmp_path/'sh'/'label_crf_8').glob('*.png')) == sorted(src.names)
    assert not list(tmp_path.rglob('*.tmp'))
    with pytest.raises(SeamError, match='rank 2'): crf_stage(src, infer_dir/'pcm', tmp_path, rank=2, world_size=2)
    with pytest.raises(SeamError, match=r'1 of 3 CAM files are missing'):
        (tmp_path/'cams').mkdir(); [(tmp_path/'cams'/f'{n}.npz').symlink_to(infer_dir/'pcm'/f'{n}.npz') for n in src.names[:2]]
        crf_stage(src, tmp_path/'cams', tmp_path/'o', progress=False)


def test_crf_command(infer_dir, tmp_path):
    run = lambda *a: subprocess.run(['seam_nb_crf', *a], capture_output=True, text=True, env=ENV, timeout=240)
    r = run('--infer-dir', str(infer_dir), '--maps', 'cam', '--alphas', '4,16', '--no-progress', '--no-scores')
    assert r.returncode == 0, r.stderr[-2000:]
    assert '3 images processed, 0 already done' in r.stdout               # dataset options read from infer_config.json
    for a in (4, 16): assert len(list((infer_dir/f'label_crf_{a}').glob('*.png'))) == 3 and not (infer_dir/f'crf_{a}').exists()
    r = run('--infer-dir', str(infer_dir), '--maps', 'cam', '--alphas', '4,16', '--no-progress')   # the scores were missing
    assert r.returncode == 0 and '3 images processed, 0 already done' in r.stdout, r.stdout
    for a in (4, 16): assert len(list((infer_dir/f'crf_{a}').glob('*.npz'))) == 3
    r = run('--infer_dir', str(infer_dir), '--maps', 'cam', '--alphas', '4,16', '--no_progress')
    assert r.returncode == 0 and '0 images processed, 3 already done' in r.stdout
    assert {'--infer_dir', '--maps', '--alphas'} <= set(crf_main.parser()._option_string_actions)


@pytest.mark.parametrize('kw, msg', [
    (dict(), '--infer_dir'),
    (dict(infer_dir='{tmp}/nope'), 'does not exist'),
    (dict(infer_dir='{infer}', maps='labels'), '--maps must be pcm or cam'),
    (dict(infer_dir='{infer}', alphas='4,x'), '--alphas'),
    (dict(infer_dir='{tmp}'), 'CAM folder'),
])
def test_crf_command_errors(infer_dir, tmp_path, capsys, kw, msg):
    kw = {k: v.format(tmp=tmp_path, infer=infer_dir) for k, v in kw.items()}
    with pytest.raises(SystemExit) as e: crf_main(**kw) if kw else crf_main(argv=[])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and msg in err and err.count('\n') == 1
