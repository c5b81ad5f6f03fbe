"""Reliability across modules: killed runs resume exactly, outputs are atomic, bad inputs give one-line errors,
crafted pickles never run, shards cover every image once."""
import os, sys, csv, time, errno, signal, subprocess
from dataclasses import asdict
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

from seam_nb.core import SeamError, save_json, torch_save_atomic, atomic_write
from seam_nb import core
from seam_nb.core import load_image, load_mask, save_cam_npz, load_cam_npz
from seam_nb.sources import VOCSource, FolderSource
from seam_nb.shapes import ShapesSource, make_shapes
from seam_nb.model import SEAMNet
from seam_nb.weights import load_weights, load_network
from seam_nb.train import make_config
from seam_nb import infer as I
from seam_nb.evaluate import threshold_curve

torch.set_num_threads(1)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1', 'MPLBACKEND': 'Agg'}
TRAIN_CLI = ['--n_images', '16', '--image-size', '64', '--crop', '48', '--resize-long', '48,64', '--batch-size', '4',
             '--no-progress', '--device', 'cpu', '--seed', '3']


def run(module, *args, timeout=240):
    return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def _default_sigint():
    """In the child: Ctrl-C back to its default. A job started in the background of a shell (`cmd &`) inherits SIGINT
    ignored, and Python then never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen(module, *args):
    return subprocess.Popen([sys.executable, '-m', module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=_default_sigint)


def one_line_error(r, expect=''):
    "A CLI failure the way users should see it: non-zero, one `error:` line, no traceback."
    assert r.returncode != 0, r.stdout[-500:]
    assert 'Traceback' not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:'), r.stderr[-2000:]
    assert expect.lower() in lines[0].lower(), lines[0]


def wait_for(cond, proc, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond(): return True
        if proc.poll() is not None: return False
        time.sleep(0.05)
    return False


def n_rows(path):
    try:
        with open(path) as f: return max(sum(1 for _ in f) - 1, 0)
    except FileNotFoundError: return 0


def temp_files(root): return sorted(p for p in Path(root).rglob('*.tmp'))


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    "A training-format checkpoint of a randomly initialised tiny SEAMNet for the Shapes classes (64 px images)."
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ckpt')/'last.pt'
    model = SEAMNet('tiny', num_classes=7)
    torch_save_atomic({'model': model.state_dict(), 'config': asdict(make_config('shapes_cpu', n_images=8, image_size=64)), 'step': 0}, path)
    return path


# ---------------------------------------------------------------- killed training resumes to the same weights
def test_sigkill_training_then_resume_gives_the_same_weights(tmp_path):
    common = ['--steps', '40', '--stop-at', '10', '--ckpt-every', '2', *TRAIN_CLI]
    straight = popen('seam_nb.train', *common, '--out', str(tmp_path/'straight'))       # runs alongside the killed one
    killed = popen('seam_nb.train', *common, '--out', str(tmp_path/'killed'))
    csv_path = tmp_path/'killed'/'losses.csv'
    reached = wait_for(lambda: n_rows(csv_path) >= 5, killed)                          # step 5: checkpoint of step 4 exists
    if not reached: straight.kill(); pytest.fail(f"training did not reach step 5: {killed.communicate()[1][-2000:]}")
    killed.send_signal(signal.SIGKILL); killed.wait()
    ck = torch.load(tmp_path/'killed'/'last.pt', weights_only=True)                   # the checkpoint on disk is whole
    assert 4 <= ck['step'] < 10
    # stray temp files of a SIGKILL can only be hidden '.<name>.*.tmp' files: never a half file under a final name
    assert all(p.name.startswith('.') for p in temp_files(tmp_path/'killed'))
    r = run('seam_nb.train', *common, '--out', str(tmp_path/'killed'), '--resume')
    assert r.returncode == 0, r.stderr[-2000:]
    assert straight.wait(timeout=240) == 0, straight.communicate()[1][-2000:]
    a = torch.load(tmp_path/'straight'/'last.pt', weights_only=True)
    b = torch.load(tmp_path/'killed'/'last.pt', weights_only=True)
    assert a['step'] == b['step'] == 10
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']: torch.testing.assert_close(a['model'][k], b['model'][k], rtol=0, atol=0, msg=k)
    with open(tmp_path/'straight'/'losses.csv') as f1, open(tmp_path/'killed'/'losses.csv') as f2:
        assert [r['step'] for r in csv.DictReader(f1)] == [r['step'] for r in csv.DictReader(f2)] == [str(i) for i in range(1, 11)]


def test_sigint_training_exits_cleanly(tmp_path):
    p = popen('seam_nb.train', '--steps', '400', '--ckpt-every', '1', *TRAIN_CLI, '--out', str(tmp_path))
    assert wait_for(lambda: n_rows(tmp_path/'losses.csv') >= 2, p), p.communicate()[1][-2000:]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and 'Traceback' not in err and 'interrupted' in err, err[-2000:]
    assert not temp_files(tmp_path)                                                   # Ctrl-C: cleanup ran
    assert torch.load(tmp_path/'last.pt', weights_only=True)['step'] >= 1


# ---------------------------------------------------------------- killed inference resumes without redoing files
def test_sigkill_inference_resumes_without_rewriting(ckpt, tmp_path):
    n = 14
    args = ['--ckpt', str(ckpt), '--n_images', str(n), '--scales', '0.5,1', '--no_progress', '--device', 'cpu', '--out', str(tmp_path)]
    p = popen('seam_nb.infer', *args)
    done = lambda: len(list((tmp_path/'label_pcm').glob('*.png'))) >= 3
    if not wait_for(done, p): pytest.fail(f"inference did not reach 3 images: {p.communicate()[1][-2000:]}")
    p.send_signal(signal.SIGKILL); p.wait()
    src = ShapesSource(n, 64, seed=0)
    finished = [nm for nm in src.names if I.is_done(tmp_path, nm)]
    assert 3 <= len(finished) < n
    stamps = {q: q.stat().st_mtime_ns for nm in finished for q in I.output_paths(tmp_path, nm).values()}
    assert all(q.name.startswith('.') for q in temp_files(tmp_path))
    r = run('seam_nb.infer', *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'{n - len(finished)} images written, {len(finished)} already done' in r.stdout
    assert stamps == {q: q.stat().st_mtime_ns for q in stamps}                         # finished files untouched
    for nm in src.names:                                                                # every output loads
        for kind, q in I.output_paths(tmp_path, nm).items():
            if kind in ('cam', 'pcm'):
                maps = load_cam_npz(q)
                assert all(v.shape == (64, 64) for v in maps.values())
            else: assert np.asarray(Image.open(q)).shape == (64, 64)


# ---------------------------------------------------------------- atomic writes
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path/'metrics.json'
    save_json({'v': 1}, target)
    def full_disk(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(core.os, 'fsync', full_disk)                                   # the data cannot reach the disk
    with pytest.raises(OSError) as e: save_json({'v': 2}, target)
    assert e.value.errno == errno.ENOSPC and 'No space left' in str(e.value)
    assert target.read_text().replace(' ', '').replace('\n', '') == '{"v":1}'          # the old file survives
    assert not temp_files(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ['metrics.json']
    # the same for a checkpoint written by torch.save
    monkeypatch.undo()
    torch_save_atomic({'w': torch.ones(2)}, tmp_path/'last.pt')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(OSError): torch_save_atomic({'w': torch.zeros(2)}, tmp_path/'last.pt')
    assert torch.load(tmp_path/'last.pt', weights_only=True)['w'].sum() == 2 and not temp_files(tmp_path)


def test_full_disk_through_a_cli_is_one_line(ckpt, tmp_path, monkeypatch, capsys):
    def full_disk(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(core.os, 'fsync', full_disk)
    with pytest.raises(SystemExit) as e:
        I.main(ckpt=str(ckpt), n_images=1, scales='1', out=str(tmp_path), no_progress=True, device='cpu')
    assert e.value.code != 0 and capsys.readouterr().err.startswith('error:')
    assert not temp_files(tmp_path)


def test_read_only_output_folder(ckpt, tmp_path):
    ro = tmp_path/'ro'; ro.mkdir(); ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK): pytest.skip('running as root: a read-only folder is still writable')
        with pytest.raises(SeamError, match='permission denied'): save_json({}, ro/'x.json')
        one_line_error(run('seam_nb.infer', '--ckpt', str(ckpt), '--n_images', '1', '--scales', '1', '--no_progress', '--out', str(ro/'sub')),
                       'permission')
    finally: ro.chmod(0o700)


# ---------------------------------------------------------------- bad inputs through the data layer
@pytest.fixture
def voc(tmp_path):
    "A two-image VOC2012 folder."
    root = tmp_path/'VOC2012'
    for d in ('JPEGImages', 'Annotations', 'SegmentationClass', 'ImageSets/Segmentation'): (root/d).mkdir(parents=True)
    for i, name in enumerate(('a', 'b')):
        img, mask, _ = make_shapes(i, 32)
        Image.fromarray(img).save(root/'JPEGImages'/f'{name}.jpg')
        core.save_label_png(np.where(mask > 0, 15, 0).astype(np.uint8), root/'SegmentationClass'/f'{name}.png')
        (root/'Annotations'/f'{name}.xml').write_text('<annotation><object><name>person</name></object></annotation>')
    (root/'ImageSets/Segmentation/train.txt').write_text('a\nb\n')
    return root


def test_bad_images_and_masks(tmp_path):
    (tmp_path/'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    with pytest.raises(SeamError, match='corrupt.jpg'): load_image(tmp_path/'corrupt.jpg')
    good = tmp_path/'m.png'; core.save_label_png(np.ones((16, 16), np.uint8), good)
    (tmp_path/'trunc.png').write_bytes(good.read_bytes()[:40])
    with pytest.raises(SeamError, match='trunc.png'): load_mask(tmp_path/'trunc.png')
    Image.fromarray(np.full((8, 8), 300, np.uint16)).save(tmp_path/'m16.png')
    with pytest.raises(SeamError, match='16'): load_mask(tmp_path/'m16.png')
    core.save_label_png(np.full((8, 8), 40, np.uint8), tmp_path/'m40.png')
    with pytest.raises(SeamError, match=r'\[40\]'): load_mask(tmp_path/'m40.png', num_classes=21)
    with pytest.raises(SeamError, match='not found'): load_image(tmp_path/'nope.jpg')
    # a 1x1 image is a valid (if useless) image: it loads and goes through multi-scale inference
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path/'one.png')
    img = load_image(tmp_path/'one.png')
    cam, pcm = I.multiscale_cam(SEAMNet('tiny', num_classes=7).eval(), img, np.ones(6), (0.5, 1.0))
    assert cam.shape == pcm.shape == (6, 1, 1) and np.isfinite(cam).all()


def test_bad_voc_folders(voc):
    src = VOCSource(voc)
    assert src.names == ['a', 'b'] and src.labels('a')[src.classes.index('person')] == 1
    (voc/'Annotations'/'b.xml').unlink()                          # missing XML: documented fallback to the mask
    assert src.label_origin('b') == 'mask' and src.labels('b')[src.classes.index('person')] == 1
    (voc/'ImageSets/Segmentation/dup.txt').write_text('a\na\nb\n')   # duplicated ids: documented, dropped
    assert VOCSource(voc, 'dup').names == ['a', 'b']
    (voc/'ImageSets/Segmentation/empty.txt').write_text('\n')
    with pytest.raises(SeamError, match='empty'): VOCSource(voc, 'empty')
    with pytest.raises(SeamError, match="no list for split 'val'"): VOCSource(voc, 'val')
    (voc/'ImageSets/Segmentation/ghost.txt').write_text('a\nzz\n')
    with pytest.raises(SeamError, match='zz.jpg'): VOCSource(voc, 'ghost')
    with pytest.raises(SeamError, match='JPEGImages'): VOCSource(voc.parent/'nowhere')
    (voc/'Annotations'/'a.xml').write_text('<annotation><object><name>person')   # broken XML
    with pytest.raises(SeamError, match='a.xml'): VOCSource(voc).labels('a')
    core.save_label_png(np.full((32, 32), 30, np.uint8), voc/'SegmentationClass'/'b.png')
    with pytest.raises(SeamError, match='30'): VOCSource(voc).mask('b')


def test_bad_folder_sources(tmp_path):
    (tmp_path/'imgs').mkdir()
    Image.fromarray(make_shapes(0, 32)[0]).save(tmp_path/'imgs'/'x.jpg')
    def src(text, **kw):
        (tmp_path/'l.csv').write_text(text); return FolderSource(tmp_path/'imgs', tmp_path/'l.csv', **kw)
    assert src('image,labels\nx.jpg,cat\n').classes == ('cat',)
    with pytest.raises(SeamError, match="unknown class 'dog'"): src('image,labels\nx.jpg,dog\n', classes=('cat',))
    with pytest.raises(SeamError, match='duplicate'): src('image,labels\nx.jpg,cat\nx.jpg,cat\n')
    with pytest.raises(SeamError, match='no images'): src('image,labels\n')
    with pytest.raises(SeamError, match='y.jpg'): src('image,labels\ny.jpg,cat\n')
    with pytest.raises(SeamError, match='not found'): FolderSource(tmp_path/'nope', tmp_path/'l.csv')


def main_error(fn, capsys, expect='', **kw):
    "The same entry point called in-process (cheaper than a subprocess): exit status 2 and one `error:` line."
    with pytest.raises(SystemExit) as e: fn(**kw)
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and expect.lower() in lines[0].lower(), err[-2000:]


def test_bad_inputs_through_the_clis(ckpt, tmp_path, capsys):
    from seam_nb import evaluate as E, train as T
    (tmp_path/'imgs').mkdir()
    (tmp_path/'imgs'/'bad.jpg').write_bytes(b'\xff\xd8\xff garbage')
    (tmp_path/'l.csv').write_text('image,labels\nbad.jpg,a b c d e f\n')   # 6 classes, as the checkpoint
    one_line_error(run('seam_nb.infer', '--ckpt', str(ckpt), '--dataset', 'folder', '--data-root', str(tmp_path/'imgs'),
                       '--csv', str(tmp_path/'l.csv'), '--no_progress', '--out', str(tmp_path/'o')), 'bad.jpg')
    assert not temp_files(tmp_path)
    main_error(I.main, capsys, 'not found', ckpt=str(tmp_path/'missing.pt'), out=str(tmp_path/'o'))
    main_error(E.main, capsys, cam_dir=str(tmp_path/'nope'), gt_dir=str(tmp_path/'nope'))
    main_error(T.main, capsys, 'bad.jpg', dataset='folder', data_root=str(tmp_path/'imgs'), csv=str(tmp_path/'l.csv'),
               out=str(tmp_path/'t'), steps=1, batch_size=1, crop=32, no_progress=True, device='cpu')
    (tmp_path/'empty.csv').write_text('image,labels\n')
    main_error(T.main, capsys, 'no images', dataset='folder', data_root=str(tmp_path/'imgs'), csv=str(tmp_path/'empty.csv'),
               out=str(tmp_path/'t2'), steps=1, no_progress=True, device='cpu')


# ---------------------------------------------------------------- crafted pickles never run
class Payload:
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


def test_crafted_pickle_is_refused_everywhere(tmp_path, capsys):
    marker = tmp_path/'PWNED'
    evil = tmp_path/'evil.pth'
    torch.save({'model': Payload(marker), 'fc8.weight': Payload(marker)}, evil)
    with pytest.raises(SeamError, match='refused|not a readable'): load_weights(SEAMNet('tiny', num_classes=7), evil)
    assert not marker.exists()
    one_line_error(run('seam_nb.infer', '--ckpt', str(evil), '--out', str(tmp_path/'o')))
    assert not marker.exists()
    (tmp_path/'run').mkdir(); (tmp_path/'run'/'last.pt').write_bytes(evil.read_bytes())
    from seam_nb import train as T
    small = dict(steps=2, n_images=16, image_size=64, crop=48, batch_size=4, no_progress=True, device='cpu')
    main_error(T.main, capsys, 'last.pt', out=str(tmp_path/'run'), resume=True, **small)
    assert not marker.exists()
    main_error(T.main, capsys, 'evil.pth', out=str(tmp_path/'w'), weights=str(evil), **small)
    assert not marker.exists()


# ---------------------------------------------------------------- shards cover every image exactly once
def test_inference_and_evaluation_shards_cover_every_image_once(ckpt, tmp_path):
    model, src = load_network(ckpt, SEAMNet), ShapesSource(7, 48, seed=5)
    seen = []
    for rank in range(2):
        res = I.infer_cams(model, src, tmp_path, scales=(1.0,), progress=False, device='cpu', rank=rank, world_size=2)
        assert res['processed'] == res['assigned']
        seen += I.shard(src.names, rank, 2)
    assert sorted(seen) == sorted(src.names) and len(seen) == len(set(seen))
    assert sorted(p.stem for p in (tmp_path/'cam').glob('*.npz')) == sorted(src.names)
    gt = tmp_path/'gt'
    for nm in src.names: core.save_label_png(src.mask(nm), gt/f'{nm}.png')
    whole = threshold_curve(tmp_path/'cam', gt, src.names, 7, alphas=[0.2, 0.3])
    parts = [threshold_curve(tmp_path/'cam', gt, I.shard(src.names, r, 2), 7, alphas=[0.2, 0.3]) for r in range(2)]
    assert sum(p.n_images for p in parts) == whole.n_images == len(src.names)
    np.testing.assert_array_equal(parts[0].conf + parts[1].conf, whole.conf)           # no image counted twice or lost
