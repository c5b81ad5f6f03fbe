"MS COCO 2014 end to end on a tiny COCO-format fixture: masks pixel by pixel, training, inference, evaluation, widgets."
import json, os, subprocess
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip('pycocotools')
from seam_nb.core import IGNORE_INDEX, load_mask
from seam_nb.coco import COCO_CLASSES, COCO_LABEL, COCOSource, coco_mask, write_tiny_coco
from seam_nb.evaluate import default_class_names
from seam_nb.widgets import as_items, model_class_names

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
run = lambda *a: subprocess.run([str(x) for x in a], capture_output=True, text=True, env=ENV, timeout=600)


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco')
    write_tiny_coco(root, 'train'); write_tiny_coco(root, 'val')
    return root


def test_masks_pixel_by_pixel(coco):
    src = COCOSource(coco, 'train', progress=False)
    m = src.mask(src.names[1])                                  # image 2: a cat polygon and a chair RLE box
    assert m.shape == (56, 72)
    chair = np.zeros_like(m, bool); chair[40:56, 0:30] = True   # RLE rows 40-55, columns 0-29: exact
    assert (m[chair & (m != COCO_LABEL[17])] == COCO_LABEL[62]).all()
    inside = np.zeros_like(m, bool); inside[11:40, 11:50] = True  # the cat polygon x 10-50, y 10-40, 1 px inside
    assert (m[inside] == COCO_LABEL[17]).all()
    outside = ~chair; outside[9:42, 9:52] = False
    assert (m[outside] == 0).all() and IGNORE_INDEX not in m
    # the stored PNG is a palette image that the package reads back unchanged
    p = src.mask_dir/f'{src.names[1]}.png'
    assert Image.open(p).mode == 'P' and (load_mask(p) == m).all()


def test_crowd_only_and_empty_images_are_left_out(coco):
    src = COCOSource(coco, 'val', progress=False)
    assert len(src) == 2 and all(src.labels(n).sum() > 0 for n in src.names)


def test_bad_input(coco, tmp_path):
    (tmp_path/'train2014').mkdir(); (tmp_path/'annotations').mkdir()
    (tmp_path/'annotations'/'instances_train2014.json').write_text('{not json')
    with pytest.raises(Exception, match='not a readable COCO'): COCOSource(tmp_path, 'train')
    with pytest.raises(Exception, match='train and val'): COCOSource(coco, 'minival')
    with pytest.raises(Exception, match='unknown COCO category'):
        coco_mask([{'category_id': 12, 'segmentation': [[0, 0, 4, 0, 4, 4, 0, 4]], 'area': 16, 'iscrowd': 0}], 8, 8)


def test_train_infer_evaluate_with_81_labels(coco, tmp_path):
    r = run('seam_nb_train', '--dataset', 'coco', '--data-root', coco, '--split', 'train', '--backbone', 'tiny',
            '--steps', '2', '--batch-size', '2', '--crop', '32', '--resize-long', '40,48', '--out', tmp_path/'run', '--no-progress')
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(tmp_path/'run'/'last.pt', weights_only=True)
    assert ck['model']['fc8.weight'].shape[0] == 81
    r = run('seam_nb_infer', '--ckpt', tmp_path/'run'/'last.pt', '--dataset', 'coco', '--data-root', coco, '--split', 'val',
            '--scales', '1', '--out', tmp_path/'infer', '--no-progress')
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list((tmp_path/'infer'/'cam').glob('*.npz'))) == 2
    r = run('seam_nb_eval', '--cam-dir', tmp_path/'infer'/'cam', '--gt-dir', coco/'masks'/'val2014', '--num-classes', '81',
            '--out', tmp_path/'eval')
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path/'eval'/'metrics.json').read_text())
    assert rep['num_classes'] == 81 and rep['classes'][1] == 'person' and 'no_ground_truth' in rep
    r = run('seam_nb_train', '--dataset', 'coco', '--data-root', tmp_path/'nowhere', '--backbone', 'tiny', '--out', tmp_path/'x')
    assert r.returncode == 2 and 'not found' in r.stderr


def test_names_and_widgets_know_81_labels(coco):
    assert default_class_names(81) == list(COCO_CLASSES) and model_class_names(81) == COCO_CLASSES[1:]
    items = as_items(COCOSource(coco, 'train', progress=False), max_side=64)
    item = next(iter(items.values()))
    assert item.classes == COCO_CLASSES[1:] and item.mask is not None and item.labels.shape == (80,)
