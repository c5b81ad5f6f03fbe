"Tests of seam_nb.affinity that notebook cells cannot hold: the reference state dict, author-style files, the CLI, VOC-sized walks."
import os, sys, subprocess
from pathlib import Path
import numpy as np
import pytest
import torch

from seam_nb.core import SeamError, save_label_png, torch_save_atomic
from seam_nb.backbone import load_weights, read_keys_tsv, state_dict_keys
from seam_nb.data import ShapesSource
from seam_nb.evaluate import save_cam_npz, read_label_png
from seam_nb import affinity as A

torch.set_num_threads(min(2, torch.get_num_threads()))
SHARED = Path(__file__).resolve().parents[1].parent/'shared'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
HEAD = ['f8_3.weight', 'f8_4.weight', 'f8_5.weight', 'f9.weight']


def cli(*args, timeout=240):
    return subprocess.run([sys.executable, '-m', 'seam_nb.affinity', *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def one_line_error(err:str) -> bool:
    return err.startswith('error:') and len(err.strip().splitlines()) == 1


@pytest.fixture(scope='module')
def aff38():
    return A.AffinityNet('resnet38')


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """A seam_nb_infer-like folder for eight Shapes images (stand-in CAMs in pcm/, their CRF labels in label_crf_4/ and
    label_crf_24/) and a 2-step tiny AffinityNet run trained from it."""
    root = tmp_path_factory.mktemp('shapes')
    src = ShapesSource(8, 128, seed=0)
    for n in src.names: save_cam_npz(root/'infer'/'pcm'/f'{n}.npz', A.synthetic_cams(src.mask(n)))
    ds = A.AffinityDataset(src, cam_dir=root/'infer'/'pcm', crop=64)       # CRF labels computed on the fly ...
    for n in src.names:
        la, ha = ds.crf_maps(n)                                              # ... and stored as seam_nb_infer would
        save_label_png(la, root/'infer'/'label_crf_4'/f'{n}.png'); save_label_png(ha, root/'infer'/'label_crf_24'/f'{n}.png')
    cam_dir, la_dir, ha_dir = A._resolve_dirs(root/'infer', None, None, None)
    cfg = A.make_aff_config('shapes_cpu', la_dir=la_dir, ha_dir=ha_dir, n_images=8, out=str(root/'run'), steps=2,
                            batch_size=2, crop=64, progress=False, device='cpu')
    A.train_affinity(cfg)
    return root, src


def test_state_dict_equals_reference_line_by_line(aff38):
    p = SHARED/'reference/resnet38_aff.keys.tsv'
    if not p.exists(): pytest.skip('reference listing not available')
    ref, ours = read_keys_tsv(p), state_dict_keys(aff38)
    assert len(ours) == len(ref) == 232
    for a, b in zip(ours, ref): assert a == b                       # name, shape, dtype, in order
    assert [k for k, *_ in ours[-4:]] == HEAD


def test_author_style_state_dict_loads(aff38):
    sd = {k: v.clone() + 0.5 if k == 'f9.weight' else v for k, v in aff38.state_dict().items() if not k.endswith('num_batches_tracked')}
    rep = load_weights(aff38, sd)                                    # PyTorch 0.4 files have no num_batches_tracked
    assert rep.filled and not rep.missing and not rep.unexpected
    assert torch.equal(aff38.f9.weight, sd['f9.weight'])
    bad = dict(sd); bad['f8_5.weight'] = torch.zeros(256, 2048, 1, 1)  # a wrong shape is refused, nothing copied
    with pytest.raises(SeamError, match='f8_5.weight'): load_weights(aff38, bad)


def test_heads_and_freeze(aff38):
    assert [(c.in_channels, c.out_channels) for c in (aff38.f8_3, aff38.f8_4, aff38.f8_5, aff38.f9)] == \
           [(512, 64), (1024, 128), (4096, 256), (448, 448)]
    assert all(c.bias is None for c in (aff38.f8_3, aff38.f8_4, aff38.f8_5, aff38.f9))
    groups = aff38.param_groups(0.1, 5e-4)
    assert [(g['lr'], g['weight_decay']) for g in groups] == [(0.1, 5e-4), (0.2, 0), (1.0, 5e-4), (2.0, 0)]
    assert {id(p) for p in groups[2]['params']} == {id(aff38.get_parameter(k)) for k in HEAD}
    aff38.train()
    assert not any(m.training for m in aff38.modules() if isinstance(m, torch.nn.BatchNorm2d))
    aff38.eval()


def test_tiny_channels_follow_backbone():
    for width in (4, 8, 16):
        m = A.AffinityNet('tiny', width=width)
        bb = m.backbone
        assert (m.f8_3.in_channels, m.f8_4.in_channels, m.f8_5.in_channels) == (bb.low_channels, bb.mid_channels, bb.out_channels)
        assert m.f9.in_channels == m.f9.out_channels == 448


def test_init_from_seam_checkpoint_takes_backbone_only(tmp_path):
    from seam_nb.model import SEAMNet
    seam = SEAMNet('tiny', num_classes=7)
    torch_save_atomic({'model': seam.state_dict(), 'step': 3}, tmp_path/'seam.pt')
    aff = A.AffinityNet('tiny')
    rep = A.load_init_weights(aff, tmp_path/'seam.pt')
    assert torch.equal(aff.conv1a.weight, seam.conv1a.weight) and torch.equal(aff.b5.conv_branch2b2.weight, seam.b5.conv_branch2b2.weight)
    assert sorted(rep.missing) == HEAD                               # heads stay at their initialisation


def test_random_walk_dense_equals_iterated_on_a_voc_sized_grid():
    h, w = 30, 24                                                   # a 240x192 image; n = 720
    g = torch.Generator().manual_seed(1)
    feat = torch.nn.functional.avg_pool2d(torch.randn(1, 16, h + 4, w + 4, generator=g), 5, 1)
    aff = A.pair_affinity(feat)
    cams = torch.rand(5, h, w, generator=g)
    ref = A.random_walk(cams, A.dense_affinity(aff, h, w), method='dense')
    for m, mat in (('iterate', A.sparse_affinity(aff, h, w)), ('iterate', A.dense_affinity(aff, h, w)), ('auto', A.sparse_affinity(aff, h, w))):
        out = A.random_walk(cams, mat, method=m)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
        assert torch.equal(out.argmax(0), ref.argmax(0))
    with pytest.raises(SeamError, match='unknown random-walk method'): A.random_walk(cams, A.sparse_affinity(aff, h, w), method='fast')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='peak memory is read from /proc')
def test_measure_random_walk_small_grid():
    res = A.measure_random_walk(16, 20, C=5)
    assert list(res) == ['dense/dense', 'iterate/dense', 'iterate/sparse']
    assert all(v['max_rel_diff'] < 1e-3 and v['seconds'] >= 0 for v in res.values())
    assert res['dense/dense']['max_abs_diff'] == 0


def test_rw_label_on_a_voc_sample_image(tmp_path):
    "Full-size VOC image (not a multiple of 8), tiny network: padding, pooling, walk, crop back."
    voc = SHARED/'voc_sample'
    if not voc.is_dir(): pytest.skip('shared/voc_sample not present')
    from seam_nb.data import load_image
    from seam_nb.evaluate import read_label_png
    names = sorted(p.stem for p in (voc/'SegmentationClass').glob('*.png'))
    if not names: pytest.skip('no segmentation masks in voc_sample')
    img, gt = load_image(voc/'JPEGImages'/f'{names[0]}.jpg'), read_label_png(voc/'SegmentationClass'/f'{names[0]}.png')
    cams = A.synthetic_cams(gt)
    model = A.AffinityNet('tiny').eval()
    lab, scores = A.rw_label(model, img, cams, return_scores=True)
    assert lab.shape == gt.shape and scores.shape == (len(cams) + 1, *gt.shape)
    assert set(np.unique(lab)) <= {0, *cams}
    # with a huge beta every affinity below 1 vanishes, T is the identity and only pooling + upsampling remain:
    # the labels must then line up with the CAM's own labels (a shifted crop or padding would break this)
    still = A.rw_label(model, img, cams, beta=1e6, logt=0)
    scores, keys = A.cam_stack(cams, gt.shape)
    direct = np.asarray(keys, np.uint8)[scores.argmax(0)]
    assert (still == direct).mean() > 0.99                     # (0.9985 here; shifting by 8 px gives 0.970)


def test_cli_help():
    r = cli('--help')
    assert r.returncode == 0 and 'train' in r.stdout and '--infer_dir' in r.stdout and '--logt' in r.stdout


def test_cli_train_resume_and_infer(shapes, tmp_path, capsys):
    root, src = shapes
    common = ['--n_images', '8', '--crop', '64', '--batch-size', '2', '--no-progress', '--device', 'cpu']
    r = cli('train', '--infer-dir', str(root/'infer'), '--steps', '2', '--out', str(tmp_path/'run'), *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'checkpoint' in r.stdout and (tmp_path/'run'/'last.pt').exists()
    A.main('train', infer_dir=str(root/'infer'), steps=3, out=str(tmp_path/'run'), resume=True, n_images=8, crop=64,
           batch_size=2, no_progress=True, device='cpu')                 # resumed in-process: the same entry point
    assert torch.load(tmp_path/'run'/'last.pt', weights_only=True)['step'] == 3
    A.main('infer', ckpt=str(tmp_path/'run'/'last.pt'), infer_dir=str(root/'infer'), n_images=8, no_progress=True)
    assert '8 pseudo labels written' in capsys.readouterr().out
    pngs = sorted((root/'infer'/'label_rw').glob('*.png'))
    assert [p.stem for p in pngs] == src.names
    assert read_label_png(pngs[0]).shape == (128, 128)
    assert not list((root/'infer'/'label_rw').glob('.*.tmp'))


def _run_main(capsys, *args, **kwargs):
    with pytest.raises(SystemExit) as e: A.main(*args, **kwargs)
    return e.value.code, capsys.readouterr().err


def test_cli_bad_inputs_one_line(shapes, tmp_path, capsys):
    root, src = shapes
    ckpt = root/'run'/'last.pt'
    cases = [
        (('fly',), {}, 'unknown mode'),
        (('train',), dict(out=str(tmp_path/'a')), 'give the CAMs'),
        (('train',), dict(cam_dir=str(tmp_path/'nope'), out=str(tmp_path/'b')), 'not found'),
        (('train',), dict(infer_dir=str(tmp_path/'nope'), out=str(tmp_path/'c')), 'not found'),
        (('train',), dict(cam_dir=str(root/'infer'/'pcm'), n_images=9, out=str(tmp_path/'d')), 'have no CAM file'),
        (('train',), dict(cam_dir=str(root/'infer'/'pcm'), preset='imagenet'), 'unknown preset'),
        (('train',), dict(cam_dir=str(root/'infer'/'pcm'), backbone='vgg16', out=str(tmp_path/'e')), 'unknown backbone'),
        (('train',), dict(la_dir=str(root/'infer'/'pcm'), out=str(tmp_path/'f')), 'both'),
        (('train',), dict(cam_dir=str(root/'infer'/'pcm'), n_images=8, out=str(root/'run')), 'already holds a run'),
        (('train',), dict(cam_dir=str(root/'infer'/'pcm'), n_images=8, out=str(root/'run'), resume=True, backbone='resnet38'), "backbone 'tiny'"),
        (('infer',), dict(cam_dir=str(root/'infer'/'pcm')), 'needs --ckpt'),
        (('infer',), dict(ckpt=str(ckpt)), 'needs the CAMs'),
        (('infer',), dict(ckpt=str(tmp_path/'none.pt'), cam_dir=str(root/'infer'/'pcm'), n_images=8), 'not found'),
        (('infer',), dict(ckpt=str(ckpt), cam_dir=str(tmp_path/'nope'), n_images=8), 'not found'),
        (('infer',), dict(ckpt=str(ckpt), cam_dir=str(root/'infer'/'pcm'), n_images=0), 'empty'),
        (('infer',), dict(ckpt=str(ckpt), cam_dir=str(root/'infer'/'pcm'), n_images=8, rw='fast'), 'unknown random-walk method'),
        (('infer',), dict(ckpt=str(ckpt), cam_dir=str(root/'infer'/'pcm'), n_images=8, backbone='resnet38', out=str(tmp_path/'o')), 'does not fit'),
    ]
    from seam_nb.model import SEAMNet
    torch_save_atomic({'model': SEAMNet('tiny', num_classes=7).state_dict(), 'config': {'backbone': 'tiny'}}, tmp_path/'seam.pt')
    cases.append((('infer',), dict(ckpt=str(tmp_path/'seam.pt'), cam_dir=str(root/'infer'/'pcm'), n_images=8, out=str(tmp_path/'o')), 'not an AffinityNet'))
    (tmp_path/'junk.pt').write_bytes(b'not a checkpoint at all')
    cases.append((('infer',), dict(ckpt=str(tmp_path/'junk.pt'), cam_dir=str(root/'infer'/'pcm'), n_images=8, out=str(tmp_path/'o')), 'not a readable'))
    for args, kw, expect in cases:
        code, err = _run_main(capsys, *args, no_progress=True, device='cpu', **kw)
        assert code == 2 and one_line_error(err) and expect in err, (args, kw, err)
    assert not (tmp_path/'o').exists() or not list((tmp_path/'o').iterdir())      # nothing half-written


def test_cli_empty_folder_dataset(tmp_path, capsys):
    (tmp_path/'imgs').mkdir(); (tmp_path/'cams').mkdir()
    (tmp_path/'labels.csv').write_text('image,labels\n')
    code, err = _run_main(capsys, 'train', dataset='folder', data_root=str(tmp_path/'imgs'), csv=str(tmp_path/'labels.csv'),
                          cam_dir=str(tmp_path/'cams'), out=str(tmp_path/'o'), no_progress=True)
    assert code == 2 and one_line_error(err), err


def test_cli_bad_input_subprocess(tmp_path):
    r = cli('infer', '--ckpt', str(tmp_path/'missing.pt'), '--cam-dir', str(tmp_path))
    assert r.returncode == 2 and one_line_error(r.stderr), r.stderr


def test_infer_dir_resolution_and_folder_dataset(shapes):
    "--infer_dir finds pcm/ and the CRF label folders; the folder dataset serves the same items as the on-the-fly one."
    root, src = shapes
    cam_dir, la_dir, ha_dir = A._resolve_dirs(root/'infer', None, None, None)
    assert (Path(cam_dir).name, Path(la_dir).name, Path(ha_dir).name) == ('pcm', 'label_crf_4', 'label_crf_24')
    assert A._resolve_dirs(root/'infer', None, 'x', 'y')[1:] == ('x', 'y')
    a = A.AffinityDataset(src, la_dir=la_dir, ha_dir=ha_dir, crop=64)
    b = A.AffinityDataset(src, cam_dir=cam_dir, crop=64)
    torch.manual_seed(3); xa, la = a[5]
    torch.manual_seed(3); xb, lb = b[5]
    assert torch.equal(xa, xb) and all(torch.equal(u, v) for u, v in zip(la, lb))
    ck = torch.load(root/'run'/'last.pt', weights_only=True)
    assert ck['step'] == 2 and ck['config']['la_dir'] == la_dir and 'f8_5.weight' in ck['model']
