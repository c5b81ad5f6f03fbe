"""Tests of seam_nb.segment and seam_nb.retrain beyond the notebooks: the loss, the dataset, inference properties, the
DeepLabv3 build, retrain_on_shapes and the seam_nb_segment command."""
import os, sys, json, subprocess, dataclasses
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seam_nb.core import SeamError, seed_everything, save_label_png, torch_save_atomic
from seam_nb.shapes import ShapesSource, SHAPES_SPLIT_SEEDS
from seam_nb.transforms import train_transform, normalize_image
from seam_nb.model import SEAMNet
from seam_nb.weights import load_checkpoint, load_network, load_init_weights
from seam_nb.evaluate import evaluate_label_dir
from seam_nb import segment as S
from seam_nb import retrain as R

torch.set_num_threads(1)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
SIZE = 64


@pytest.fixture(scope='module')
def src(): return ShapesSource(8, SIZE, seed=SHAPES_SPLIT_SEEDS['train'])


@pytest.fixture(scope='module')
def gt_dir(src, tmp_path_factory):
    "Ground-truth masks of the training images written as pseudo labels (255 band included)."
    return S.write_labels(src, tmp_path_factory.mktemp('labels')/'gt', src.mask)


@pytest.fixture(scope='module')
def run(gt_dir, tmp_path_factory):
    "A finished 6-step tiny run on perfect labels."
    out = tmp_path_factory.mktemp('run')/'seg'
    cfg = R.shapes_seg_config(gt_dir, n_train=8, steps=6, image_size=SIZE, out=out, batch_size=4, progress=False, device='cpu')
    R.train_segmentation(cfg)
    return out


def cli(*args, timeout=240):
    return subprocess.run(['seam_nb_segment', *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


def call_main(capsys, **kw):
    "Run the CLI entry point in-process; returns (exit code, stderr)."
    with pytest.raises(SystemExit) as e: R.main(**kw)
    return e.value.code, capsys.readouterr().err


# --- loss -------------------------------------------------------------------------------------------------------

def test_ignored_pixels_contribute_nothing():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 7, 6, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (3, 7, 6), generator=g)
    ign = torch.rand(3, 7, 6, generator=g) < 0.5
    y[ign] = 255
    loss = S.seg_loss(x, y); loss.backward()
    assert x.grad.permute(0, 2, 3, 1)[ign].abs().max().item() == 0
    x2 = x.detach().clone(); x2.permute(0, 2, 3, 1)[ign] = 50.
    assert S.seg_loss(x2, y).item() == pytest.approx(loss.item(), abs=1e-6)
    # the mean is over labelled pixels only: the same as the loss of those pixels alone
    ref = F.cross_entropy(x.detach().permute(0, 2, 3, 1)[~ign], y[~ign])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    # nothing labelled: an exact zero that still has a graph
    z = S.seg_loss(x, torch.full_like(y, 255))
    assert z.item() == 0 and z.requires_grad


# --- data -------------------------------------------------------------------------------------------------------

def test_dataset_reports_all_missing_labels_in_one_error(src, gt_dir, tmp_path):
    part = tmp_path/'part'; part.mkdir()
    for n in src.names[:3]: (part/f'{n}.png').write_bytes((gt_dir/f'{n}.png').read_bytes())
    with pytest.raises(SeamError) as e: S.PseudoLabelDataset(src, part)
    msg = str(e.value)
    assert '5 of 8' in msg and src.names[3] in msg and '\n' not in msg
    with pytest.raises(SeamError, match='does not exist'): S.PseudoLabelDataset(src, tmp_path/'nope')
    with pytest.raises(SeamError, match='empty'): S.PseudoLabelDataset(ShapesSource(0, SIZE), gt_dir)
    with pytest.raises(SeamError, match='label_dir'): S.PseudoLabelDataset(src, None)


def test_dataset_pairs_images_and_pads_crops_with_255(src, gt_dir):
    ds = S.PseudoLabelDataset(src, gt_dir, train_transform(SIZE + 16, None, jitter=False))
    x, y = ds[0]
    assert x.shape == (3, SIZE + 16, SIZE + 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert (y == 255).sum() >= (SIZE + 16) ** 2 - SIZE ** 2           # the padding is ignored
    x, y = S.PseudoLabelDataset(src, gt_dir)[1]                         # no transform: the image and its label as stored
    assert torch.equal(y, torch.from_numpy(src.mask(src.names[1]).astype(np.int64)))
    assert torch.allclose(x, normalize_image(src.image(src.names[1])))


def test_dataset_rejects_labels_of_wrong_size_or_values(src, gt_dir, tmp_path):
    bad = tmp_path/'bad'; bad.mkdir()
    for n in src.names: (bad/f'{n}.png').write_bytes((gt_dir/f'{n}.png').read_bytes())
    save_label_png(np.zeros((10, 10), np.uint8), bad/f'{src.names[0]}.png')
    save_label_png(np.full((SIZE, SIZE), 40, np.uint8), bad/f'{src.names[1]}.png')
    ds = S.PseudoLabelDataset(src, bad)
    with pytest.raises(SeamError, match='10x10'): ds[0]
    with pytest.raises(SeamError, match='40'): ds[1]


def test_corrupt_labels_degrades_but_keeps_classes(src):
    m = src.mask(src.names[0])
    noisy = S.corrupt_labels(m, seed=3)
    present = set(np.unique(m)) - {255}
    assert noisy.shape == m.shape and noisy.dtype == np.uint8 and set(np.unique(noisy)) <= present
    valid = m != 255
    assert (noisy[valid] != m[valid]).any()
    clean = S.corrupt_labels(m, shift=0, p_drop=0, n_blobs=0)
    assert np.array_equal(clean[valid], m[valid])


# --- training ---------------------------------------------------------------------------------------------------

def test_a_few_steps_on_perfect_labels_lower_the_loss(src, gt_dir, run):
    ds = S.PseudoLabelDataset(src, gt_dir)
    xb, yb = map(torch.stack, zip(*[ds[i] for i in range(len(ds))]))
    def loss_of(model):
        model.eval()
        with torch.no_grad(): return S.seg_loss(model(xb), yb).item()
    seed_everything(0)                                  # the seed train_segmentation initialises with
    before = loss_of(S.SegNet('tiny', 7))
    after = loss_of(load_network(run/'last.pt', S.SegNet))
    assert after < before
    ck = load_checkpoint(run/'last.pt')
    assert ck['step'] == 6 and ck['config']['label_dir'] == str(gt_dir)
    assert (run/'losses.csv').is_file() and not list(run.glob('*.tmp'))


def test_resume_continues_and_refuses_another_architecture(gt_dir, tmp_path):
    out = tmp_path/'r'
    cfg = R.shapes_seg_config(gt_dir, n_train=8, steps=4, image_size=SIZE, out=out, batch_size=4, progress=False, device='cpu')
    assert R.train_segmentation(dataclasses.replace(cfg, stop_at=2))['step'] == 2
    with pytest.raises(SeamError, match='already holds a run'): R.train_segmentation(cfg)
    assert R.train_segmentation(dataclasses.replace(cfg, resume=True))['step'] == 4
    seam = tmp_path/'seam'; seam.mkdir()
    torch_save_atomic({'model': SEAMNet('tiny', num_classes=7).state_dict(), 'config': {'backbone': 'tiny'}, 'step': 1}, seam/'last.pt')
    with pytest.raises(SeamError, match='not a segmentation network'):
        R.train_segmentation(dataclasses.replace(cfg, out=str(seam), resume=True))


def test_retrain_on_shapes_reports_both_mious_and_reuses_a_finished_run(gt_dir, tmp_path, monkeypatch):
    out = tmp_path/'retrain'
    res = R.retrain_on_shapes(gt_dir, n_train=8, steps=3, image_size=SIZE, n_eval=3, scales=(1.0,), out=out, batch_size=4)
    assert 0 <= res['miou'] <= 1 and res['n_eval'] == 3 and res['eval_split'] == 'val'
    assert res['pseudo_miou'] == pytest.approx(1.0)      # ground truth as pseudo labels (255 band ignored)
    assert len(res['_losses']) == 3 and (out/'last.pt').is_file()
    monkeypatch.setattr(R, 'train_segmentation', lambda cfg: pytest.fail('a finished run was trained again'))
    again = R.retrain_on_shapes(gt_dir, n_train=8, steps=3, image_size=SIZE, n_eval=3, scales=(1.0,), out=out, batch_size=4)
    assert again['miou'] == pytest.approx(res['miou'])
    with pytest.raises(SeamError, match='different'):
        R.retrain_on_shapes(gt_dir, n_train=8, steps=3, image_size=SIZE, n_eval=3, out=out, batch_size=4, lr=0.5)
    with pytest.raises(SeamError, match='eval_split'): R.retrain_on_shapes(gt_dir, n_train=8, eval_split='train')
    json.dumps({k: v for k, v in res.items() if not k.startswith('_')})          # the plain values are JSON-ready


def test_retrain_on_shapes_without_out_uses_a_temporary_run(src, tmp_path, monkeypatch):
    "out=None: a temporary run folder, deleted afterwards; noisy labels give a pseudo mIoU below 1."
    import tempfile
    noisy = S.write_labels(src, tmp_path/'noisy', lambda n: S.corrupt_labels(src.mask(n), seed=1))
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path/'tmp')); (tmp_path/'tmp').mkdir()
    res = R.retrain_on_shapes(noisy, n_train=3, steps=1, image_size=SIZE, n_eval=2, scales=(1.0,), batch_size=2)
    assert 0 <= res['pseudo_miou'] < 1 and res['out'] is None and 0 <= res['miou'] <= 1
    assert not list((tmp_path/'tmp').iterdir())


def test_label_folder_miou_through_evaluate_label_dir(src, gt_dir, tmp_path):
    "segment.label_dir_miou is gone: evaluate_label_dir with gt=source.mask (and relabel=ForegroundOnly.binarize) does it."
    r = evaluate_label_dir(gt_dir, src.mask, src.names, src.num_classes)
    assert r['miou'] == pytest.approx(1.0) and r['n_images'] == len(src)
    # every foreground label swapped for another one: wrong per class, right as 'object' vs background
    swap = S.write_labels(src, tmp_path/'swap', lambda n: np.where((src.mask(n) > 0) & (src.mask(n) < 255),
                                                                   src.mask(n) % 6 + 1, src.mask(n)).astype(np.uint8))
    assert evaluate_label_dir(swap, src.mask, src.names, src.num_classes)['miou'] < 0.5
    fg = S.ForegroundOnly(src)
    r = evaluate_label_dir(swap, fg.mask, fg.names, fg.num_classes, relabel=getattr(fg, 'binarize', None))
    assert r['miou'] == pytest.approx(1.0) and r['conf'].shape == (2, 2)


# --- inference --------------------------------------------------------------------------------------------------

def test_multiscale_flip_is_a_distribution_and_flip_consistent(src):
    seed_everything(2)
    net = S.SegNet('tiny', 7).eval()
    img = src.image(src.names[2])
    sym = np.ascontiguousarray(np.concatenate([img[:, :SIZE // 2], img[:, :SIZE // 2][:, ::-1]], 1))
    assert np.array_equal(sym, sym[:, ::-1])
    p = S.multiscale_probs(net, sym, scales=(0.5, 1.0, 1.25))
    assert p.shape == (7, SIZE, SIZE) and p.dtype == np.float32 and p.min() >= 0
    np.testing.assert_allclose(p.sum(0), 1, atol=1e-5)
    np.testing.assert_allclose(p, p[:, :, ::-1], atol=1e-5)
    # without the mirrored views the output of a plain CNN is not symmetric: the flips are what make it so
    q = S.multiscale_probs(net, sym, scales=(1.0,), flip=False)
    assert np.abs(q - q[:, :, ::-1]).max() > 1e-4


def test_evaluate_segmentation_scores_and_writes_predictions(run, tmp_path):
    model = load_network(run/'last.pt', S.SegNet)
    val = ShapesSource(3, SIZE, seed=SHAPES_SPLIT_SEEDS['val'])
    res = R.evaluate_segmentation(model, val, scales=(1.0,), pred_dir=tmp_path/'pred')
    assert res['conf'].shape == (7, 7) and res['n_images'] == 3 and 0 <= res['miou'] <= 1
    assert res['conf'].sum() == sum(int((val.mask(n) != 255).sum()) for n in val.names)
    assert sorted(p.stem for p in (tmp_path/'pred').glob('*.png')) == val.names
    crf = R.evaluate_segmentation(model, val, scales=(1.0,), crf=True)
    assert crf['conf'].sum() == res['conf'].sum()


def test_deeplabv3_builds_offline_at_input_size(monkeypatch, tmp_path):
    import torch.hub
    def no_download(*a, **k): raise AssertionError('tried to download weights')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', no_download)
    net = S.SegNet('deeplabv3_resnet50', num_classes=5).eval()
    with torch.no_grad(): out = net(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 5, SIZE, SIZE)
    assert net.features(torch.randn(1, 3, SIZE, SIZE)).shape[-2:] == (SIZE // 8, SIZE // 8)
    # initial weights from local files: an ImageNet-style ResNet-50 (fc ignored), a torchvision DeepLabv3 (aux head dropped)
    r50 = tmp_path/'r50.pth'
    torch.save({**net.backbone.state_dict(), 'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)}, r50)
    rep = load_init_weights(net, r50)
    assert len(rep.loaded) == len(net.backbone.state_dict()) and 'fc.weight' in rep.unexpected
    full = tmp_path/'deeplab.pth'
    torch.save(net.state_dict(), full)                                  # a whole SegNet/DeepLabv3 file
    assert len(load_init_weights(net, full).loaded) == len(net.state_dict())


def test_deeplabv3_file_with_aux_head_initialises_the_whole_network(tmp_path):
    net = S.SegNet('deeplabv3_resnet50', num_classes=5).eval()
    full = tmp_path/'deeplab.pth'
    torch.save({**net.state_dict(), 'aux_classifier.4.weight': torch.zeros(5, 256, 1, 1)}, full)   # aux head dropped
    assert len(load_init_weights(net, full).loaded) == len(net.state_dict())


# --- command line -----------------------------------------------------------------------------------------------

def test_cli_help_lists_the_options():
    text = R.main.parser().format_help()
    for opt in ('--mode', '--label_dir', '--ckpt', '--crf', '--scales', '--resume', '--dataset', '--data_root'): assert opt in text


def test_cli_bad_input_as_a_script(tmp_path):
    "`seam_nb_segment` (formerly `python -m seam_nb.segment`; one subprocess: starting Python with torch is the slow part)."
    r = cli('--mode', 'train', '--label-dir', tmp_path/'missing', '--out', tmp_path/'o', '--no_progress')
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0
    assert r.stderr.startswith('error:') and 'missing' in r.stderr and 'Traceback' not in r.stderr


def test_cli_bad_inputs_one_line_errors(capsys, tmp_path, gt_dir, run):
    cases = [
        (dict(mode='fit'), 'mode'),
        (dict(mode='train', out=str(tmp_path/'a')), 'label_dir'),
        (dict(mode='train', label_dir=str(gt_dir), n_images=0, out=str(tmp_path/'b')), 'empty'),
        (dict(mode='train', label_dir=str(gt_dir), n_images=20, image_size=SIZE, out=str(tmp_path/'c')), 'missing'),
        (dict(mode='train', label_dir=str(gt_dir), backbone='resnet38', out=str(tmp_path/'d')), 'backbone'),
        (dict(mode='eval', ckpt=str(tmp_path/'none.pt')), 'not found'),
        (dict(mode='eval', ckpt=str(run/'last.pt'), scales='a,b'), 'scales'),
        (dict(mode='eval', ckpt=str(run/'last.pt'), dataset='voc', data_root=str(tmp_path/'VOC')), 'not found'),
    ]
    seam = tmp_path/'seam.pt'
    torch_save_atomic({'model': SEAMNet('tiny', num_classes=7).state_dict(), 'config': {'backbone': 'tiny'}}, seam)
    cases.append((dict(mode='eval', ckpt=str(seam), n_images=2, image_size=SIZE), 'not a trained SegNet'))   # weights.load_network's words
    wrong = tmp_path/'wrong.pt'
    torch.save(S.SegNet('tiny', 7, width=8).state_dict(), wrong)
    cases.append((dict(mode='train', label_dir=str(gt_dir), n_images=8, image_size=SIZE, weights=str(wrong), out=str(tmp_path/'e')), 'wrong shape'))
    five = tmp_path/'five.pt'
    torch.save(S.SegNet('tiny', 5).state_dict(), five)
    cases.append((dict(mode='eval', ckpt=str(five), n_images=2, image_size=SIZE), 'predicts 5 labels'))
    for kw, part in cases:
        code, err = call_main(capsys, no_progress=True, **kw)
        assert code == 2, kw
        assert err.startswith('error:') and err.strip().count('\n') == 0, (kw, err)
        assert part in err, (kw, err)


def test_cli_train_then_eval(capsys, tmp_path, gt_dir):
    out = tmp_path/'cli'
    R.main(mode='train', label_dir=str(gt_dir), n_images=8, image_size=SIZE, crop=48, steps=2, batch_size=4,
           out=str(out), device='cpu', no_progress=True)
    assert (out/'last.pt').is_file() and (out/'losses.png').is_file()
    R.main(mode='eval', n_images=3, out=str(out), scales='1', save_pred=True, device='cpu', no_progress=True)
    rep = json.loads((out/'eval_val.json').read_text())
    assert rep['split'] == 'val' and rep['n_images'] == 3 and 0 <= rep['miou'] <= 1 and len(rep['iou']) == 7
    assert len(list((out/'pred_val').glob('*.png'))) == 3
    assert 'mIoU' in capsys.readouterr().out
    assert not list(out.rglob('*.tmp'))
