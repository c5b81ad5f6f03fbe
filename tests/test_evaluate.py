"""Tests of seam_nb.evaluate that notebook cells cannot hold: the seam_nb_eval command (subprocess and in-process),
bad inputs and files, and the real VOC sample in ../shared."""
import json, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seam_nb.core import save_label_png, save_cam_npz, load_cam_npz, load_mask
from seam_nb.measure import synthetic_eval_folder
from seam_nb.evaluate import (main, threshold_curve, evaluate_label_dir, confusion_matrix,
                              confusion_loop, mean_iou)

SHARED = Path(__file__).resolve().parents[1].parent/'shared'
VOC = SHARED/'voc_sample'


def _cli():
    "The installed console script if there is one, else the module run as a script (same argument parsing)."
    exe = shutil.which('seam_nb_eval')
    return [exe] if exe else [sys.executable, '-m', 'seam_nb.evaluate']


def run_cli(*args, cwd=None):
    return subprocess.run(_cli() + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=120)


def call_main(capsys, **kw):
    "Run `main` in-process; returns (exit code, stdout, stderr). No options: an empty command line (a bare `main()` reads sys.argv)."
    try:
        main(**kw) if kw else main(argv=[]); code = 0
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy')
    names = synthetic_eval_folder(root, n_images=5, size=48, blur=4, seed=3)
    (root/'list.txt').write_text('\n'.join(names) + '\n')
    return root, names


def test_help():
    r = run_cli('--help')
    assert r.returncode == 0
    for opt in ('--cam_dir', '--label_dir', '--gt_dir', '--voc_root', '--sweep', '--alpha', '--out'): assert opt in r.stdout


def test_cli_cam_sweep_writes_report(toy, tmp_path):
    root, names = toy
    out = tmp_path/'report'
    r = run_cli('--cam_dir', root/'cam', '--gt_dir', root/'gt', '--list', root/'list.txt', '--sweep', '--out', out)
    assert r.returncode == 0, r.stderr
    assert 'tuned on ground truth' in r.stdout and 'fixed α=0.26' in r.stdout and 'aeroplane' in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ['class_iou.png', 'metrics.json', 'threshold_curve.png']
    rep = json.loads((out/'metrics.json').read_text())
    assert rep['fixed']['alpha'] == 0.26 and rep['n_images'] == len(names)
    assert 'ground truth' in rep['tuned_on_ground_truth']['note']
    assert rep['tuned_on_ground_truth']['miou'] >= rep['fixed']['miou']
    assert len(rep['curve']['alpha']) == len(rep['curve']['miou']) == 61
    cv = threshold_curve(root/'cam', root/'gt', names)
    assert rep['fixed']['miou'] == pytest.approx(cv.fixed_miou)
    with Image.open(out/'threshold_curve.png') as im: assert im.format == 'PNG'


def test_fixed_only_has_no_tuned_number(toy, capsys):
    root, names = toy
    code, out, err = call_main(capsys, cam_dir=str(root/'cam'), gt_dir=str(root/'gt'), alpha=0.3)
    assert code == 0, err
    assert 'fixed α=0.3' in out and 'tuned' not in out


def test_alpha_without_ground_truth(toy, tmp_path, capsys):
    "The GT-free α is reported beside the fixed one, with or without --sweep, and comes from the maps alone."
    root, names = toy
    code, out, err = call_main(capsys, cam_dir=str(root/'cam'), gt_dir=str(root/'gt'), out=str(tmp_path/'o'))
    assert code == 0, err
    assert 'chosen without ground truth' in out and 'no GT' in out
    rep = json.loads((tmp_path/'o'/'metrics.json').read_text())
    a = rep['no_ground_truth']['alpha']
    assert 0 < a < 1 and 'no ground truth' in rep['no_ground_truth']['note']
    # the masks play no part in it: scoring the same maps against other (all-background) masks gives the same α
    blank = tmp_path/'blank'; blank.mkdir()
    for n in names: save_label_png(np.zeros_like(load_mask(root/'gt'/f'{n}.png')), blank/f'{n}.png')
    assert threshold_curve(root/'cam', blank, names).gt_free_alpha == a


def test_label_dir_default_names_and_note(toy, tmp_path, capsys):
    root, names = toy
    pred = tmp_path/'pred'; pred.mkdir()
    for n in names[:3]: shutil.copy(root/'cam_label'/f'{n}.png', pred/f'{n}.png')
    code, out, err = call_main(capsys, label_dir=str(pred), gt_dir=str(root/'gt'), out=str(tmp_path/'o'))
    assert code == 0, err
    assert 'note: 3 of 5 ground-truth images have a prediction' in out
    rep = json.loads((tmp_path/'o'/'metrics.json').read_text())
    assert rep['kind'] == 'labels' and rep['n_images'] == 3 and rep['coverage'] == 1.0
    assert not list((tmp_path/'o').glob('*.tmp')) and not list((tmp_path/'o').glob('.*'))   # atomic writes leave no temp files


def test_power_background(toy, capsys):
    root, names = toy
    code, out, err = call_main(capsys, cam_dir=str(root/'cam'), gt_dir=str(root/'gt'), bg='power', sweep=True)
    assert code == 0, err
    assert 'fixed α=4' in out and 'power background' in out


@pytest.mark.parametrize('kw, msg', [
    (dict(), 'exactly one of --cam_dir and --label_dir'),
    (dict(cam_dir='X', label_dir='Y', gt_dir='Z'), 'exactly one of'),
    (dict(cam_dir='{root}/cam'), '--gt_dir'),
    (dict(cam_dir='{root}/cam', gt_dir='{root}/nope'), 'does not exist'),
    (dict(cam_dir='{root}/nope', gt_dir='{root}/gt'), 'does not exist'),
    (dict(cam_dir='{root}/cam', gt_dir='{root}/gt', list='{root}/missing_list.txt'), 'not found'),
    (dict(cam_dir='{root}/cam', gt_dir='{root}/gt', class_names='a,b'), '--class_names lists 2 names'),
    (dict(cam_dir='{root}/cam', gt_dir='{root}/gt', num_classes=3, class_names='a,b,c'), 'num_classes'),
    (dict(voc_root='{root}/no_voc', cam_dir='{root}/cam'), 'VOC folder'),
])
def test_bad_options(toy, capsys, kw, msg):
    root, _ = toy
    kw = {k: v.format(root=root) if isinstance(v, str) else v for k, v in kw.items()}
    code, out, err = call_main(capsys, **kw)
    assert code == 2
    assert err.startswith('error: ') and msg in err and err.count('\n') == 1


def test_missing_prediction_files_reported(toy, tmp_path):
    root, names = toy
    cams = tmp_path/'cam'; shutil.copytree(root/'cam', cams)
    for n in names[1:3]: (cams/f'{n}.npz').unlink()
    r = run_cli('--cam_dir', cams, '--gt_dir', root/'gt', '--list', root/'list.txt')
    assert r.returncode == 2
    assert r.stderr.startswith('error: 2 of 5 CAM files are missing') and f'{names[1]}.npz' in r.stderr
    assert r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr


def test_empty_list_and_bad_files(toy, tmp_path, capsys):
    root, names = toy
    (tmp_path/'empty.txt').write_text('\n')
    code, _, err = call_main(capsys, cam_dir=str(root/'cam'), gt_dir=str(root/'gt'), list=str(tmp_path/'empty.txt'))
    assert code == 2 and 'empty' in err
    # a corrupt CAM file, a CAM with a pickled object array, an RGB ground truth: each named in one line
    cams = tmp_path/'cam'; shutil.copytree(root/'cam', cams)
    (cams/f'{names[0]}.npz').write_bytes(b'garbage')
    code, _, err = call_main(capsys, cam_dir=str(cams), gt_dir=str(root/'gt'))
    assert code == 2 and f'{names[0]}.npz' in err
    np.savez(cams/f'{names[0]}.npz', **{'1': np.array([{'a': 1}], dtype=object)})
    code, _, err = call_main(capsys, cam_dir=str(cams), gt_dir=str(root/'gt'))
    assert code == 2 and f'{names[0]}.npz' in err
    np.savez(cams/f'{names[0]}.npz', **{'1': np.full((48, 48), np.nan, np.float16)})
    code, _, err = call_main(capsys, cam_dir=str(cams), gt_dir=str(root/'gt'))
    assert code == 2 and 'NaN' in err
    np.savez(cams/f'{names[0]}.npz', **{'1': np.zeros((10, 10), np.float16)})
    code, _, err = call_main(capsys, cam_dir=str(cams), gt_dir=str(root/'gt'))
    assert code == 2 and names[0] in err and 'shape' in err
    gt = tmp_path/'gt'; shutil.copytree(root/'gt', gt)
    Image.new('RGB', (48, 48)).save(gt/f'{names[1]}.png')
    code, _, err = call_main(capsys, cam_dir=str(root/'cam'), gt_dir=str(gt))
    assert code == 2 and 'mode RGB' in err and names[1] in err       # ground truth is read by core.load_mask now


def test_label_size_mismatch(toy, tmp_path, capsys):
    root, names = toy
    pred = tmp_path/'pred'; shutil.copytree(root/'cam_label', pred)
    save_label_png(np.zeros((10, 12), np.uint8), pred/f'{names[2]}.png')
    code, _, err = call_main(capsys, label_dir=str(pred), gt_dir=str(root/'gt'))
    assert code == 2 and names[2] in err and '12x10' in err


def test_unsure_pixels(toy, tmp_path):
    root, names = toy
    pred = tmp_path/'pred'; shutil.copytree(root/'cam_label', pred)
    lab = load_mask(pred/f'{names[0]}.png'); lab[:, :10] = 255; save_label_png(lab, pred/f'{names[0]}.png')
    r_bg = evaluate_label_dir(pred, root/'gt', names)
    r_skip = evaluate_label_dir(pred, root/'gt', names, unsure='skip')
    assert 0 < r_skip['coverage'] < 1
    assert r_bg['conf'].sum() > r_skip['conf'].sum()


def test_accumulation_equals_one_big_matrix():
    rng = np.random.default_rng(5)
    gts = [rng.integers(0, 21, (rng.integers(5, 40), 31)).astype(np.uint8) for _ in range(6)]
    for g in gts: g[rng.random(g.shape) < 0.2] = 255
    preds = [rng.integers(0, 21, g.shape).astype(np.uint8) for g in gts]
    running = np.zeros((21, 21), np.int64)
    for p, g in zip(preds, gts): confusion_matrix(p, g, conf=running)
    assert np.array_equal(running, sum(confusion_loop(p, g) for p, g in zip(preds, gts)))
    assert np.array_equal(running, confusion_matrix(np.concatenate(preds), np.concatenate(gts)))


def test_cam_npz_roundtrip(tmp_path):
    cams = {1: np.random.default_rng(0).random((5, 7)), 12: np.zeros((5, 7))}
    save_cam_npz(tmp_path/'x.npz', cams)
    with np.load(tmp_path/'x.npz', allow_pickle=False) as z:
        assert sorted(z.files) == ['1', '12'] and all(z[k].dtype == np.float16 for k in z.files)
    back = load_cam_npz(tmp_path/'x.npz')
    assert list(back) == [1, 12] and np.allclose(back[1], cams[1], atol=1e-3)


# --- the real VOC sample in ../shared ---------------------------------------------------------------------------

def _voc_or_skip():
    if not (VOC/'SegmentationClass').is_dir(): pytest.skip('../shared/voc_sample is absent')
    return [l.strip() for l in (VOC/'ImageSets'/'Segmentation'/'train.txt').read_text().split()]


def test_voc_root_perfect_cams_score_100(tmp_path, capsys):
    train = _voc_or_skip()
    cams = tmp_path/'cam'
    for n in train:   # CAMs that are exactly the ground-truth masks: every scored pixel is right at any α in [0, 1)
        gt = load_mask(VOC/'SegmentationClass'/f'{n}.png')
        save_cam_npz(cams/f'{n}.npz', {int(k): (gt == k).astype(np.float32) for k in np.unique(gt) if 0 < k < 255})
    code, out, err = call_main(capsys, cam_dir=str(cams), voc_root=str(VOC), sweep=True, out=str(tmp_path/'o'))
    assert code == 0, err
    rep = json.loads((tmp_path/'o'/'metrics.json').read_text())
    assert rep['n_images'] == len(train) == 16                       # --split train is the default
    assert rep['fixed']['miou'] == pytest.approx(1.0)
    assert rep['per_class']['cow'] is None                           # absent from the train half: not averaged
    assert rep['fixed']['pixel_acc'] == pytest.approx(1.0)


def test_voc_ground_truth_as_labels(capsys):
    _voc_or_skip()
    code, out, err = call_main(capsys, label_dir=str(VOC/'SegmentationClassAug'), voc_root=str(VOC), split='val')
    assert code == 0, err
    assert 'mIoU 100.00%' in out


def test_voc_shifted_labels_vs_loop():
    train = _voc_or_skip()
    conf, ref = np.zeros((21, 21), np.int64), np.zeros((21, 21), np.int64)
    for n in train[:4]:
        gt = load_mask(VOC/'SegmentationClass'/f'{n}.png')
        pred = np.roll(np.where(gt == 255, 0, gt), 15, axis=1)        # a wrong-ish prediction
        confusion_matrix(pred, gt, conf=conf); ref += confusion_loop(pred, gt)
    assert np.array_equal(conf, ref)
    m = mean_iou(conf)
    assert 0 < m.miou < 1 and 0 < m.pixel_acc < 1
