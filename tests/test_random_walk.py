"""Tests of seam_nb.random_walk that notebook cells cannot hold: VOC-sized walks, a full-size VOC image, the label writer
(resume, shards, zoom) and the seam_nb_rw command (formerly `seam_nb_affinity infer`)."""
import os, sys, subprocess
from pathlib import Path
import numpy as np
import pytest
import torch

from seam_nb.core import SeamError, torch_save_atomic, load_mask, load_image
from seam_nb.weights import load_network
from seam_nb.measure import measure_random_walk
from seam_nb import affinity as A
from seam_nb import random_walk as RW

torch.set_num_threads(min(2, torch.get_num_threads()))
SHARED = Path(__file__).resolve().parents[1].parent/'shared'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def cli(*args, timeout=240):
    return subprocess.run(['seam_nb_rw', *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def one_line_error(err:str) -> bool:
    return err.startswith('error:') and len(err.strip().splitlines()) == 1


def test_random_walk_dense_equals_iterated_on_a_voc_sized_grid():
    h, w = 30, 24                                                   # a 240x192 image; n = 720
    g = torch.Generator().manual_seed(1)
    feat = torch.nn.functional.avg_pool2d(torch.randn(1, 16, h + 4, w + 4, generator=g), 5, 1)
    aff = A.pair_affinity(feat)
    cams = torch.rand(5, h, w, generator=g)
    ref = RW.random_walk(cams, A.dense_affinity(aff, h, w), method='dense')
    for m, mat in (('iterate', A.sparse_affinity(aff, h, w)), ('iterate', A.dense_affinity(aff, h, w)), ('auto', A.sparse_affinity(aff, h, w))):
        out = RW.random_walk(cams, mat, method=m)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
        assert torch.equal(out.argmax(0), ref.argmax(0))
    with pytest.raises(SeamError, match='unknown random-walk method'): RW.random_walk(cams, A.sparse_affinity(aff, h, w), method='fast')
    assert set(RW.RW_METHODS) == {'auto', 'dense', 'iterate'}


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='peak memory is read from /proc')
def test_measure_random_walk_small_grid():
    res = measure_random_walk(16, 20, C=5)
    assert list(res) == ['dense/dense', 'iterate/dense', 'iterate/sparse']
    assert all(v['max_rel_diff'] < 1e-3 and v['seconds'] >= 0 for v in res.values())
    assert res['dense/dense']['max_abs_diff'] == 0


def test_random_walk_label_on_a_voc_sample_image(tmp_path):
    "Full-size VOC image (not a multiple of 8), tiny network: padding, pooling, walk, crop back."
    voc = SHARED/'voc_sample'
    if not voc.is_dir(): pytest.skip('shared/voc_sample not present')
    names = sorted(p.stem for p in (voc/'SegmentationClass').glob('*.png'))
    if not names: pytest.skip('no segmentation masks in voc_sample')
    img, gt = load_image(voc/'JPEGImages'/f'{names[0]}.jpg'), load_mask(voc/'SegmentationClass'/f'{names[0]}.png')
    cams = A.synthetic_cams(gt)
    model = A.AffinityNet('tiny').eval()
    lab, scores = RW.random_walk_label(model, img, cams, return_scores=True)
    assert lab.shape == gt.shape and scores.shape == (len(cams) + 1, *gt.shape)
    assert set(np.unique(lab)) <= {0, *cams}
    # with a huge beta every affinity below 1 vanishes, T is the identity and only pooling + upsampling remain:
    # the labels must then line up with the CAM's own labels (a shifted crop or padding would break this)
    still = RW.random_walk_label(model, img, cams, beta=1e6, logt=0)
    scores, keys = RW.cam_stack(cams, gt.shape)
    direct = np.asarray(keys, np.uint8)[scores.argmax(0)]
    assert (still == direct).mean() > 0.99                     # (0.9985 here; shifting by 8 px gives 0.970)


def test_zoom_in():
    img = np.random.default_rng(0).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    cams = {2: np.linspace(0, 1, 140, dtype=np.float32).reshape(10, 14)}
    assert RW.zoom_in(img, cams, 1) == (img, cams)
    big, bc = RW.zoom_in(img, cams, 2.0)
    assert big.shape == (20, 28, 3) and big.dtype == np.uint8 and list(bc) == [2]
    assert bc[2].shape == (20, 28) and 0 <= bc[2].min() and bc[2].max() <= 1


def test_write_random_walk_labels_resume_shards_zoom(aff_shapes, tmp_path):
    root, src = aff_shapes
    model = load_network(root/'run'/'last.pt', A.AffinityNet)
    cams = root/'infer'/'pcm'
    res = RW.write_random_walk_labels(model, src, cams, tmp_path/'rw', progress=False)
    assert res == {'written': 8, 'skipped': 0, 'total': 8}
    assert sorted(p.stem for p in (tmp_path/'rw').glob('*.png')) == sorted(src.names)
    assert RW.write_random_walk_labels(model, src, cams, tmp_path/'rw', progress=False) == {'written': 0, 'skipped': 8, 'total': 8}
    got = [RW.write_random_walk_labels(model, src, cams, tmp_path/'sh', rank=r, world_size=3, progress=False) for r in range(3)]
    assert [g['total'] for g in got] == [3, 3, 2]
    assert sorted(p.stem for p in (tmp_path/'sh').glob('*.png')) == sorted(src.names)
    for n in src.names:                                             # the same labels whichever process wrote them
        assert np.array_equal(load_mask(tmp_path/'sh'/f'{n}.png'), load_mask(tmp_path/'rw'/f'{n}.png'))
    RW.write_random_walk_labels(model, src, cams, tmp_path/'zoom', zoom=1.5, progress=False)
    assert all(load_mask(p).shape == (128, 128) for p in (tmp_path/'zoom').glob('*.png'))   # back at image size
    with pytest.raises(SeamError, match='rank 3'): RW.write_random_walk_labels(model, src, cams, tmp_path/'x', rank=3, world_size=3)
    assert not list(tmp_path.rglob('.*.tmp'))


def test_cli_help():
    r = cli('--help')
    assert r.returncode == 0 and '--infer_dir' in r.stdout and '--logt' in r.stdout and '--zoom' in r.stdout and '--rw' in r.stdout
    assert {'--ckpt', '--cam_dir', '--beta', '--alpha'} <= set(RW.main.parser()._option_string_actions)


def test_cli_writes_labels(aff_shapes, tmp_path, capsys):
    "Pseudo labels through the console script (dashed options) and in-process (the same entry point); default out INFER_DIR/label_rw."
    root, src = aff_shapes
    ckpt = root/'run'/'last.pt'
    r = cli('--ckpt', str(ckpt), '--cam-dir', str(root/'infer'/'pcm'), '--n-images', '8', '--out', str(tmp_path/'rw'),
            '--no-progress', '--device', 'cpu')
    assert r.returncode == 0, r.stderr[-2000:]
    assert '8 pseudo labels written' in r.stdout
    RW.main(ckpt=str(ckpt), infer_dir=str(root/'infer'), n_images=8, no_progress=True)
    assert '8 pseudo labels written' in capsys.readouterr().out
    pngs = sorted((root/'infer'/'label_rw').glob('*.png'))
    assert [p.stem for p in pngs] == src.names
    assert load_mask(pngs[0]).shape == (128, 128)
    assert all(np.array_equal(load_mask(p), load_mask(tmp_path/'rw'/p.name)) for p in pngs)
    assert not list((root/'infer'/'label_rw').glob('.*.tmp'))
    RW.main(ckpt=str(ckpt), infer_dir=str(root/'infer'), n_images=8, no_progress=True)     # run again: resumes
    assert '0 pseudo labels written, 8 already there' in capsys.readouterr().out


def _run_main(capsys, **kwargs):
    with pytest.raises(SystemExit) as e: RW.main(**kwargs)
    return e.value.code, capsys.readouterr().err


def test_cli_bad_inputs_one_line(aff_shapes, tmp_path, capsys):
    root, src = aff_shapes
    ckpt, pcm = root/'run'/'last.pt', str(root/'infer'/'pcm')
    cases = [
        (dict(cam_dir=pcm), 'give --ckpt'),
        (dict(ckpt=str(ckpt)), 'give the CAMs'),
        (dict(ckpt=str(tmp_path/'none.pt'), cam_dir=pcm, n_images=8, out=str(tmp_path/'o')), 'not found'),
        (dict(ckpt=str(ckpt), cam_dir=str(tmp_path/'nope'), n_images=8), 'does not exist'),
        (dict(ckpt=str(ckpt), infer_dir=str(tmp_path/'nope'), n_images=8), 'does not exist'),
        (dict(ckpt=str(ckpt), cam_dir=pcm, n_images=9, out=str(tmp_path/'o')), '1 of 9 CAM files are missing'),
        (dict(ckpt=str(ckpt), cam_dir=pcm, n_images=8, rw='fast'), 'unknown random-walk method'),
        (dict(ckpt=str(ckpt), cam_dir=pcm, n_images=8, backbone='resnet38', out=str(tmp_path/'o')), 'does not fit'),
    ]
    from seam_nb.model import SEAMNet
    torch_save_atomic({'model': SEAMNet('tiny', num_classes=7).state_dict(), 'config': {'backbone': 'tiny'}}, tmp_path/'seam.pt')
    cases.append((dict(ckpt=str(tmp_path/'seam.pt'), cam_dir=pcm, n_images=8, out=str(tmp_path/'o')), 'not a trained AffinityNet'))
    (tmp_path/'junk.pt').write_bytes(b'not a checkpoint at all')
    cases.append((dict(ckpt=str(tmp_path/'junk.pt'), cam_dir=pcm, n_images=8, out=str(tmp_path/'o')), 'not a readable'))
    for kw, expect in cases:
        code, err = _run_main(capsys, no_progress=True, device='cpu', **kw)
        assert code == 2 and one_line_error(err) and expect in err, (kw, err)
    assert not (tmp_path/'o').exists() or not list((tmp_path/'o').iterdir())      # nothing half-written


def test_cli_empty_image_list(aff_shapes, tmp_path, capsys):
    root, _ = aff_shapes
    (tmp_path/'imgs').mkdir()
    (tmp_path/'labels.csv').write_text('image,labels\n')
    code, err = _run_main(capsys, ckpt=str(root/'run'/'last.pt'), cam_dir=str(root/'infer'/'pcm'), dataset='folder',
                          data_root=str(tmp_path/'imgs'), csv=str(tmp_path/'labels.csv'), no_progress=True)
    assert code == 2 and one_line_error(err), err


def test_cli_bad_input_subprocess(tmp_path):
    r = cli('--ckpt', str(tmp_path/'missing.pt'), '--cam-dir', str(tmp_path))
    assert r.returncode == 2 and one_line_error(r.stderr), r.stderr
