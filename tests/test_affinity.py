"""Tests of seam_nb.affinity and seam_nb.affinity_train that notebook cells cannot hold: the reference state dict,
author-style files, presets and config checks, the seam_nb_affinity (training) command.
The random walk and seam_nb_rw (formerly `seam_nb_affinity infer`) are in test_random_walk.py."""
import os, sys, subprocess
from pathlib import Path
import numpy as np
import pytest
import torch

from seam_nb.core import SeamError, torch_save_atomic
from seam_nb.backbones import read_keys_tsv, state_dict_keys
from seam_nb.weights import load_weights, load_init_weights
from seam_nb import affinity as A
from seam_nb import affinity_train as AT

torch.set_num_threads(min(2, torch.get_num_threads()))
FIXTURES = Path(__file__).resolve().parent/'fixtures'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
HEAD = ['f8_3.weight', 'f8_4.weight', 'f8_5.weight', 'f9.weight']


def cli(*args, timeout=240):
    return subprocess.run(['seam_nb_affinity', *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def one_line_error(err:str) -> bool:
    return err.startswith('error:') and len(err.strip().splitlines()) == 1


@pytest.fixture(scope='module')
def aff38():
    return A.AffinityNet('resnet38')


def test_state_dict_equals_reference_line_by_line(aff38):
    ref, ours = read_keys_tsv(FIXTURES/'resnet38_aff.keys.tsv'), state_dict_keys(aff38)
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
    "weights.load_init_weights (which replaced affinity.load_init_weights): a SEAM checkpoint gives the backbone only."
    from seam_nb.model import SEAMNet
    seam = SEAMNet('tiny', num_classes=7)
    torch_save_atomic({'model': seam.state_dict(), 'step': 3}, tmp_path/'seam.pt')
    aff = A.AffinityNet('tiny')
    rep = load_init_weights(aff, tmp_path/'seam.pt')
    assert torch.equal(aff.conv1a.weight, seam.conv1a.weight) and torch.equal(aff.b5.conv_branch2b2.weight, seam.b5.conv_branch2b2.weight)
    assert sorted(rep.missing) == HEAD                               # heads stay at their initialisation
    # an AffinityNet checkpoint initialises the whole network, heads included
    torch_save_atomic({'model': aff.state_dict()}, tmp_path/'aff.pt')
    twin = A.AffinityNet('tiny')
    rep = load_init_weights(twin, tmp_path/'aff.pt')
    assert not rep.missing and torch.equal(twin.f9.weight, aff.f9.weight)


def test_synthetic_cams():
    "Stand-in CAMs (numpy box blur now): one map per present class, in [0, 1], peaking inside its object."
    mask = np.zeros((64, 80), np.uint8); mask[10:30, 10:40] = 3; mask[40:60, 50:75] = 7; mask[0, 0] = 255
    cams = A.synthetic_cams(mask)
    assert sorted(cams) == [3, 7]
    for k, c in cams.items():
        assert c.dtype == np.float32 and c.shape == mask.shape and c.min() >= 0 and c.max() == pytest.approx(1)
        assert c[mask == k].mean() > 4 * c[mask != k].mean()
    shifted = A.synthetic_cams(mask, shift=0.1)
    assert np.unravel_index(shifted[3].argmax(), mask.shape) != np.unravel_index(cams[3].argmax(), mask.shape)
    assert A.synthetic_cams(np.zeros((8, 8), np.uint8)) == {}


def test_presets_and_config_checks():
    "AFF_PRESETS: voc_resnet38 is SEAM's recipe (lr 0.01, also AffinityConfig's default), voc_resnet38_psa PSA's (lr 0.1)."
    assert set(AT.AFF_PRESETS) == {'voc_resnet38', 'voc_resnet38_psa', 'shapes_cpu'}
    assert AT.AffinityConfig().lr == 0.01
    assert AT.make_aff_config('voc_resnet38').lr == 0.01 and AT.make_aff_config('voc_resnet38_psa').lr == 0.1
    with pytest.raises(SeamError, match='unknown preset'): AT.make_aff_config('voc_resnet38_seam')
    with pytest.raises(SeamError, match=r'unknown \w+ option\(s\) method'): AT.make_aff_config('shapes_cpu', method='seam')
    cfg = AT.make_aff_config('shapes_cpu')
    assert cfg.check() is cfg and cfg.backbone == 'tiny'
    for kw, msg in [(dict(radius=1), 'radius'), (dict(crop=32), 'too small'), (dict(backbone='vgg16'), 'unknown backbone'),
                    (dict(batch_size=0), 'batch_size'), (dict(amp='fp8'), 'unknown amp')]:
        with pytest.raises(SeamError, match=msg): AT.make_aff_config('shapes_cpu', **kw).check()
    assert not hasattr(AT, 'check_aff_config') and not hasattr(A, 'check_aff_config')


def test_cli_help():
    r = cli('--help')
    assert r.returncode == 0 and '--infer_dir' in r.stdout and '--la_dir' in r.stdout and '--resume' in r.stdout
    assert '--logt' not in r.stdout                                  # the random walk is seam_nb_rw now
    assert {'--infer_dir', '--cam_dir', '--preset'} <= set(AT.main.parser()._option_string_actions)


def test_cli_train_and_resume(aff_shapes, tmp_path):
    root, src = aff_shapes
    common = ['--n_images', '8', '--crop', '64', '--batch-size', '2', '--no-progress', '--device', 'cpu']
    r = cli('--infer-dir', str(root/'infer'), '--steps', '2', '--out', str(tmp_path/'run'), *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'checkpoint' in r.stdout and (tmp_path/'run'/'last.pt').exists()
    AT.main(infer_dir=str(root/'infer'), steps=3, out=str(tmp_path/'run'), resume=True, n_images=8, crop=64,
            batch_size=2, no_progress=True, device='cpu')                # resumed in-process: the same entry point
    assert torch.load(tmp_path/'run'/'last.pt', weights_only=True)['step'] == 3
    # the old positional modes are gone: `seam_nb_affinity train` / `infer` are refused by the parser
    for mode in ('train', 'infer'):
        r = cli(mode, '--infer-dir', str(root/'infer'), '--out', str(tmp_path/'x'))
        assert r.returncode == 2 and 'unrecognized arguments' in r.stderr and not (tmp_path/'x').exists()


def _run_main(capsys, **kwargs):
    with pytest.raises(SystemExit) as e: AT.main(**kwargs)
    return e.value.code, capsys.readouterr().err


def test_cli_bad_inputs_one_line(aff_shapes, tmp_path, capsys):
    root, src = aff_shapes
    pcm = str(root/'infer'/'pcm')
    cases = [
        (dict(out=str(tmp_path/'a')), 'give the CAMs'),
        (dict(cam_dir=str(tmp_path/'nope'), out=str(tmp_path/'b')), 'does not exist'),
        (dict(infer_dir=str(tmp_path/'nope'), out=str(tmp_path/'c')), 'does not exist'),
        (dict(cam_dir=pcm, n_images=9, out=str(tmp_path/'d')), '1 of 9 CAM files are missing'),
        (dict(cam_dir=pcm, preset='imagenet'), 'unknown preset'),
        (dict(cam_dir=pcm, backbone='vgg16', out=str(tmp_path/'e')), 'unknown backbone'),
        (dict(la_dir=pcm, out=str(tmp_path/'f')), 'both'),
        (dict(cam_dir=pcm, n_images=8, out=str(root/'run')), 'already holds a run'),
        (dict(cam_dir=pcm, n_images=8, out=str(root/'run'), resume=True, backbone='resnet38'), "backbone 'tiny'"),
        (dict(cam_dir=pcm, n_images=8, resize_long='64', out=str(tmp_path/'g')), '--resize_long'),
        (dict(la_dir=str(root/'infer'/'label_crf_4'), ha_dir=str(root/'infer'/'label_crf_24'), n_images=8,
              out=str(tmp_path/'h')), '--grid-labels vote'),                 # label PNGs cannot give block-averaged scores
        (dict(cam_dir=pcm, n_images=8, grid_labels='soft', out=str(tmp_path/'i')), 'unknown grid_labels'),
        (dict(cam_dir=pcm, n_images=8, preset='voc_resnet38', out=str(tmp_path/'j')), '--weights FILE'),
    ]
    for kw, expect in cases:
        code, err = _run_main(capsys, no_progress=True, device='cpu', **kw)
        assert code == 2 and one_line_error(err) and expect in err, (kw, err)
    assert not any((tmp_path/d).exists() and list((tmp_path/d).iterdir()) for d in 'abcdefghij')   # nothing half-written


def test_cli_empty_folder_dataset(tmp_path, capsys):
    (tmp_path/'imgs').mkdir(); (tmp_path/'cams').mkdir()
    (tmp_path/'labels.csv').write_text('image,labels\n')
    code, err = _run_main(capsys, dataset='folder', data_root=str(tmp_path/'imgs'), csv=str(tmp_path/'labels.csv'),
                          cam_dir=str(tmp_path/'cams'), out=str(tmp_path/'o'), no_progress=True)
    assert code == 2 and one_line_error(err), err


def test_cli_bad_input_subprocess(tmp_path):
    r = cli('--cam-dir', str(tmp_path/'missing'), '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and one_line_error(r.stderr), r.stderr


def test_infer_dir_resolution_and_folder_dataset(aff_shapes):
    "--infer_dir finds pcm/ and the CRF score (or, for the vote, label) folders; folders and on-the-fly CRF give the same items."
    root, src = aff_shapes
    cam_dir, la_dir, ha_dir = AT.resolve_infer_dir(root/'infer')
    assert (Path(cam_dir).name, Path(la_dir).name, Path(ha_dir).name) == ('pcm', 'crf_4', 'crf_24')
    vote_dirs = AT.resolve_infer_dir(root/'infer', grid_labels='vote')[1:]
    assert [Path(d).name for d in vote_dirs] == ['label_crf_4', 'label_crf_24']
    assert AT.resolve_infer_dir(root/'infer', None, 'x', 'y')[1:] == ('x', 'y')
    assert AT.resolve_infer_dir(None, 'c', None, None) == ('c', None, None)
    a = AT.AffinityDataset(src, la_dir=la_dir, ha_dir=ha_dir, crop=64)
    b = AT.AffinityDataset(src, cam_dir=cam_dir, crop=64)
    torch.manual_seed(3); xa, la = a[5]
    torch.manual_seed(3); xb, lb = b[5]
    assert torch.equal(xa, xb) and all(torch.equal(u, v) for u, v in zip(la, lb))
    c = AT.AffinityDataset(src, la_dir=la_dir, ha_dir=ha_dir, crop=64, grid_labels='vote')       # vote from the scores ...
    d = AT.AffinityDataset(src, *vote_dirs, crop=64, grid_labels='vote')                          # ... or from the PNGs
    torch.manual_seed(3); _, lc = c[5]
    torch.manual_seed(3); _, ld = d[5]
    assert all(torch.equal(u, v) for u, v in zip(lc, ld))
    ck = torch.load(root/'run'/'last.pt', weights_only=True)
    assert ck['step'] == 2 and ck['config']['la_dir'] == la_dir and 'f8_5.weight' in ck['model']
