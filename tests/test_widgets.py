"""Tests of seam_nb.widgets (EquivarianceExplorer) and seam_nb.viewer (CamPcmViewer) without a browser: set widget values
in Python and check the PNG bytes, scores and label maps they produce; checkpoint loading and its fallback; uploads;
the shared VOC sample."""
import datetime
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from seam_nb.core import SeamError
from seam_nb.shapes import SHAPE_CLASSES, make_shapes
from seam_nb.equivariance import Rescale, consistency, consistency_curve
from seam_nb.measure import bench_widgets
from seam_nb.model import SEAMNet
from seam_nb import widgets as W
from seam_nb import viewer as V

SHARED = Path(__file__).resolve().parents[1].parent/'shared'
K = len(SHAPE_CLASSES)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    "Untrained (baseline, seam) networks: what the widgets fall back to without checkpoints."
    return W.load_shapes_models(tmp_path_factory.mktemp('no_ckpt'))


@pytest.fixture(scope='module')
def shapes_items():
    return W.default_images(n_shapes=2, n_voc=0)


@pytest.fixture(scope='module')
def explorer(models, shapes_items):
    return W.EquivarianceExplorer(models, images=shapes_items)


def png_bytes(img):
    buf = io.BytesIO(); Image.fromarray(img).save(buf, format='PNG'); return buf.getvalue()


def upload_value(name, content):
    return ({'name': name, 'type': 'image/png', 'size': len(content), 'content': memoryview(content),
             'last_modified': datetime.datetime.now()},)


# ---------------------------------------------------------------- checkpoints
def test_fallback_is_visible(models, explorer):
    for m in models:
        assert m.note.startswith(W.UNTRAINED_NOTE) and not m.training
        assert m.num_classes == K + 1
    assert W.UNTRAINED_NOTE in explorer.note.value


def test_checkpoints_are_loaded(tmp_path):
    torch.manual_seed(3)
    base, seam = SEAMNet('tiny', num_classes=K + 1, width=8), SEAMNet('tiny', num_classes=K + 1, width=8)
    for kind, m in (('baseline', base), ('seam', seam)):
        torch.save({'model': m.state_dict(), 'config': {'backbone': 'tiny', 'method': kind}, 'step': 10},
                   tmp_path/f'shapes_{kind}.pth')
    b, s = W.load_shapes_models(tmp_path)
    assert (b.note, s.note) == ('trained: shapes_baseline.pth', 'trained: shapes_seam.pth')
    for got, want in ((b, base), (s, seam)):
        for k, v in want.state_dict().items(): assert torch.equal(got.state_dict()[k], v), k
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(): assert torch.allclose(s(x)[0], seam.eval()(x)[0])


def test_bad_checkpoints_are_reported(tmp_path):
    (tmp_path/'shapes_seam.pth').write_bytes(b'\x00garbage')
    with pytest.raises(SeamError, match='shapes_seam.pth'): W.load_shapes_models(tmp_path)
    torch.save({'model': {'conv.weight': torch.zeros(1)}}, tmp_path/'shapes_seam.pth')
    with pytest.raises(SeamError, match=r"shapes_seam\.pth is not a trained SEAMNet: it has no fc8"):   # weights.load_network's words
        W.load_shapes_models(tmp_path)
    state = SEAMNet('tiny', num_classes=K + 1).state_dict(); state.pop('f9.weight')
    torch.save({'model': state, 'config': {'backbone': 'tiny'}}, tmp_path/'shapes_seam.pth')
    with pytest.raises(SeamError, match='no f9 layer'): W.load_shapes_models(tmp_path)    # a head layer is absent
    state = SEAMNet('tiny', num_classes=K + 1).state_dict(); state.pop('conv1a.weight')
    torch.save({'model': state, 'config': {'backbone': 'tiny'}}, tmp_path/'shapes_seam.pth')
    with pytest.raises(SeamError, match=r'missing: conv1a\.weight'): W.load_shapes_models(tmp_path)   # a backbone layer


class Evil:
    def __reduce__(self): return (print, ('unpickled!',))


def test_checkpoint_is_never_unpickled(tmp_path, capsys):
    torch.save({'model': Evil()}, tmp_path/'shapes_baseline.pth')
    with pytest.raises(SeamError, match='shapes_baseline.pth'): W.load_shapes_models(tmp_path)
    assert 'unpickled!' not in capsys.readouterr().out


# ---------------------------------------------------------------- explorer
def test_identity_is_consistent(explorer):
    explorer.scale.value, explorer.flip.value, explorer.rotation.value = 1.0, False, 0
    assert set(explorer.scores) == {'baseline', 'SEAM'}
    assert all(abs(s) < 1e-6 for s in explorer.scores.values())
    assert explorer.image.value[:8] == b'\x89PNG\r\n\x1a\n'


def test_flip_changes_the_picture(explorer):
    explorer.scale.value, explorer.flip.value, explorer.rotation.value = 1.0, False, 0
    png, cam = explorer.image.value, explorer.panels['SEAM']['cam_tx'].copy()
    explorer.flip.value = True
    assert explorer.image.value != png
    assert not np.array_equal(explorer.panels['SEAM']['cam_tx'], cam)
    assert np.array_equal(explorer.panels['SEAM']['image'], explorer.item.img[:, ::-1])   # exact mirror
    assert all(s > 0 for s in explorer.scores.values())
    explorer.flip.value = False
    assert explorer.image.value == png                                        # same state, same picture


def test_scale_score_is_the_package_consistency(explorer, models):
    explorer.flip.value, explorer.rotation.value = False, 0
    explorer.scale.value = 0.5
    h, w = explorer.item.img.shape[:2]
    assert explorer.panels['baseline']['cam_tx'].shape == (h // 2, w // 2)
    for name, m in zip(('baseline', 'SEAM'), models):        # same formula, computed without the widget
        want = consistency(lambda x: m(x)[0], explorer.item.x, Rescale(0.5))
        assert explorer.scores[name] == pytest.approx(want, abs=1e-6)
    s05 = dict(explorer.scores)
    explorer.rotation.value = 45
    assert explorer.scores != s05
    explorer.rotation.value = 0
    assert explorer.scores == s05


def test_cache_serves_repeated_states(explorer):
    explorer.scale.value = 1.25
    fn = explorer.cam_fns['SEAM']
    misses = fn.misses
    explorer.scale.value = 1.0; explorer.scale.value = 1.25
    assert fn.misses == misses                                  # both states were computed before


def test_curve_button(explorer):
    explorer.curve_button.click()
    assert explorer.curve_image.value[:4] == b'\x89PNG'
    i = list(explorer.curve_scales).index(1.0)
    for vals in explorer.curves.values():
        assert len(vals) == len(explorer.curve_scales) and vals[i] == 0 and (np.delete(vals, i) > 0).all()


def test_present_classes_come_first(explorer, shapes_items):
    for name, item in shapes_items.items():
        explorer.image_picker.value = name
        present = {k + 1 for k in np.flatnonzero(item.labels)}
        opts = [v for _, v in explorer.class_picker.options]
        assert set(opts[:len(present)]) == present and sorted(opts) == list(range(1, K + 1))
        assert explorer.class_picker.value in present


def test_upload(models):
    ex = W.EquivarianceExplorer(models, images=W.default_images(n_shapes=1, n_voc=0))
    n = len(ex.items)
    ex.upload.value = upload_value('notes.txt', b'not an image')
    assert 'notes.txt' in ex.note.value and len(ex.items) == n
    img = make_shapes(5, 96)[0]
    ex.upload.value = upload_value('mine.png', png_bytes(img))
    assert ex.image_picker.value == 'upload: mine.png'
    assert np.array_equal(ex.item.img, img) and ex.item.mask is None
    assert all(abs(s) < 1e-6 for s in ex.scores.values())


def test_no_pyplot_figures_and_threads_restored(models, shapes_items):
    import matplotlib.pyplot as plt
    before, threads = plt.get_fignums(), torch.get_num_threads()
    ex = W.EquivarianceExplorer(models, images=shapes_items)
    ex.scale.value = 0.75
    vw = V.CamPcmViewer(models[1], images=shapes_items, crf=False)
    vw.threshold.value = 0.5
    assert plt.get_fignums() == before                       # widgets never leave figures for the notebook to show
    assert torch.get_num_threads() == threads


@pytest.mark.skipif(not (SHARED/'voc_sample'/'JPEGImages').is_dir(), reason='../shared/voc_sample not present')
def test_voc_sample_in_the_menu(models):
    assert W.voc_sample_dir().resolve() == (SHARED/'voc_sample').resolve()
    items = W.default_images(n_shapes=1, n_voc=2)
    voc = [n for n in items if not n.startswith('shapes_')]
    assert len(voc) == 2 and all(max(items[n].img.shape[:2]) <= 160 for n in voc)
    vw = V.CamPcmViewer(models[1], images=items, crf=False)
    vw.image_picker.value = voc[0]
    assert set(vw.scores.values()) == {None}                  # VOC classes vs a Shapes network: no mIoU
    ex = W.EquivarianceExplorer(models, images=items)
    ex.image_picker.value = voc[0]; ex.scale.value = 0.5
    assert all(s > 0 for s in ex.scores.values())


def test_trained_seam_is_more_consistent():
    "The point of the explorer: with the shipped checkpoints, SEAM's CAM follows rescaling better than the baseline's."
    base, seam = W.load_shapes_models()
    if W.UNTRAINED_NOTE in base.note or W.UNTRAINED_NOTE in seam.note: pytest.skip('trained Shapes checkpoints not shipped yet')
    items = W.default_images(n_shapes=4, n_voc=0)
    mean = {n: np.mean([consistency_curve(W.CachedCAM(m, threads=1), it.x, (0.5, 0.75, 1.5)) for it in items.values()])
            for n, m in (('baseline', base), ('seam', seam))}
    assert mean['seam'] < mean['baseline'], mean


# ---------------------------------------------------------------- CAM / PCM viewer
def test_threshold_changes_labels_and_miou(models, shapes_items):
    vw = V.CamPcmViewer(models[1], images=shapes_items, crf=False)
    vw.threshold.value = 0.1
    lab, miou, png = vw.label_maps['CAM'].copy(), vw.scores['CAM'], vw.image.value
    vw.threshold.value = 0.9
    assert (vw.label_maps['CAM'] > 0).sum() < (lab > 0).sum()      # more background at a higher threshold
    assert vw.scores['CAM'] != miou and vw.image.value != png
    assert set(vw.scores) == {'CAM', 'PCM'}                        # no CRF when switched off
    assert 'CRF off' in vw.note.value


class OracleCAM(nn.Module):
    "A stand-in network whose CAM and PCM are the one-hot ground truth of one image (background channel included)."
    def __init__(self, mask):
        super().__init__()
        self.num_classes, self.dummy = K + 1, nn.Parameter(torch.zeros(1))
        m = torch.as_tensor(mask.astype(np.int64)).clamp(max=K)
        self.cam = nn.functional.one_hot(m, K + 1).permute(2, 0, 1)[None].float()
    def forward(self, x): return self.cam, self.cam


def test_perfect_maps_score_one():
    img, mask, labels = make_shapes(11, 64)
    item = W.ImageItem('oracle', img, mask, labels, SHAPE_CLASSES)
    vw = V.CamPcmViewer(OracleCAM(mask), images={'oracle': item}, crf=False, threshold=0.5)
    assert vw.scores == {'CAM': pytest.approx(1.0), 'PCM': pytest.approx(1.0)}
    valid = mask != 255
    assert np.array_equal(vw.label_maps['CAM'][valid], mask[valid])


def test_crf_panel():
    pytest.importorskip('pydensecrf.densecrf')
    img, mask, labels = make_shapes(11, 64)
    item = W.ImageItem('oracle', img, mask, labels, SHAPE_CLASSES)
    vw = V.CamPcmViewer(OracleCAM(mask), images={'oracle': item}, threshold=0.5)
    assert vw.crf and set(vw.scores) == {'CAM', 'PCM', 'CRF'}
    assert 0 < vw.scores['CRF'] <= 1
    crf = vw.label_maps['CRF']
    assert set(np.unique(crf)) <= {0} | {k + 1 for k in np.flatnonzero(labels)}     # only labelled classes
    big = np.bincount(mask[mask != 255].ravel())[1:].argmax() + 1                   # the largest object survives
    assert (crf[mask == big] == big).mean() > 0.9                 # (small ones may not: the CRF smooths them away)
    vw.threshold.value = 0.3
    assert vw.image.value[:4] == b'\x89PNG'


def test_bench_reports_times(models):
    res = bench_widgets(n=2, models=models, crf=False)
    assert set(res) == {'explorer new scale', 'explorer cached scale', 'explorer flip', 'viewer threshold'}
    assert all(v['median_ms'] > 0 and v['max_ms'] >= v['median_ms'] for v in res.values())


# ---------------------------------------------------------------- state tests moved from the notebooks
@pytest.fixture(scope='module')
def nb_setup():
    "As the widgets notebook builds them: the shipped networks (or the untrained fallback), 2 Shapes + 2 VOC images."
    b, s = W.load_shapes_models()
    items = W.default_images(n_shapes=2, n_voc=2)
    return {'baseline': b, 'SEAM': s}, items, list(items)


def test_explorer_state(nb_setup):
    "Moved from 19_widgets: scale/flip/rotation/image/tab/upload values drive scores, panels and curves."
    models, items, names = nb_setup
    ex = W.EquivarianceExplorer(models, images={n: items[n] for n in names[:2]})
    assert ex.scores == {'baseline': 0.0, 'SEAM': 0.0}                  # scale 1, no flip, no rotation: identity
    png0, cam0 = ex.image.value, ex.panels['SEAM']['cam_tx']
    ex.flip.value = True                                               # flip on: CAM(t(x)) is a mirrored picture's CAM
    assert ex.image.value != png0
    assert ex.panels['SEAM']['cam_tx'].shape == cam0.shape
    assert not np.array_equal(ex.panels['SEAM']['cam_tx'], cam0)
    assert all(s > 0 for s in ex.scores.values())
    ex.flip.value = False; assert ex.scores == {'baseline': 0.0, 'SEAM': 0.0}
    ex.scale.value = 0.5
    assert ex.panels['baseline']['cam_tx'].shape == (64, 64)
    s05 = dict(ex.scores)
    ex.rotation.value = 30; assert ex.scores != s05
    ex.rotation.value = 0;  assert ex.scores == s05                    # back to a cached state, same numbers
    ex.image_picker.value = names[1]; assert ex.scores != s05
    ex.tabs.selected_index = 1                                         # opening the second tab computes the curve
    assert set(ex.curves) == {'baseline', 'SEAM'}
    assert ex.curves['SEAM'][list(ex.curve_scales).index(1.0)] == 0.0
    assert ex.curve_image.value[:4] == b'\x89PNG'
    buf = io.BytesIO(); Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(buf, format='PNG')
    ex.upload.value = ({'name': 'grey.png', 'type': 'image/png', 'size': 0, 'content': memoryview(buf.getvalue()),
                        'last_modified': datetime.datetime.now()},)
    assert ex.image_picker.value == 'upload: grey.png'
    ex.tabs.selected_index = 0; ex.image_picker.value = names[0]; ex.scale.value = 1.0
    assert ex.scores == {'baseline': 0.0, 'SEAM': 0.0}


def test_viewer_state(nb_setup):
    "Moved from 20_viewer: threshold and class changes redraw; a VOC photograph has no comparable mIoU for a Shapes network."
    models, items, names = nb_setup
    vw = V.CamPcmViewer(models['SEAM'], images={n: items[n] for n in names})
    png0, s0, lab0 = vw.image.value, dict(vw.scores), vw.label_maps['CAM']
    vw.threshold.value = 0.9
    assert not np.array_equal(vw.label_maps['CAM'], lab0)             # another threshold, another label map ...
    assert vw.scores['CAM'] != s0['CAM']                               # ... and another mIoU
    assert vw.image.value != png0
    assert vw.class_picker.options[0][0].endswith('(in image)')
    png1, lab1 = vw.image.value, vw.label_maps['CAM']
    vw.class_picker.value = vw.class_picker.options[-1][1]             # another class: new score maps, same label maps
    assert vw.image.value != png1 and np.array_equal(vw.label_maps['CAM'], lab1)
    if W.voc_sample_dir() is not None:
        vw.image_picker.value = names[-1]                              # a VOC photograph for a Shapes network: no comparable mIoU
        assert set(vw.scores.values()) == {None}
    vw.image_picker.value = names[0]; vw.threshold.value = 0.26
    assert vw.scores['CAM'] == pytest.approx(s0['CAM'])
