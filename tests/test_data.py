"Tests of seam_nb.core (image/mask IO), seam_nb.sources, seam_nb.transforms and seam_nb.shapes that need files: VOC sample, CSV folders, broken images, DataLoader workers."
import io, os
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

from seam_nb.core import SeamError, label_to_pil, seed_everything, VOC_CLASSES
from seam_nb.core import load_image, load_mask
from seam_nb.sources import read_id_list
from seam_nb.sources import VOCSource, FolderSource, ClsDataset, SegDataset, labels_from_mask
from seam_nb.transforms import (Compose, RandomResizeLong, RandomHFlip, ColorJitter, Normalize, RandomCrop, ToTensor,
                                train_transform, multiscale_views, normalize_image, denormalize)
from seam_nb.shapes import SHAPE_CLASSES, make_shapes, ShapesSource

SHARED = Path(__file__).resolve().parents[1].parent/'shared'
VOC = SHARED/'voc_sample'
needs_voc = pytest.mark.skipif(not (VOC/'JPEGImages').is_dir(), reason=f"{VOC} not available")
XML_IDS = ['2007_000032', '2007_000033', '2007_000039', '2007_000042']


def ids(split): return (VOC/'ImageSets'/'Segmentation'/f'{split}.txt').read_text().split()


def fake_voc(tmp_path, train=None, val=None, seg_ids=None, xml=True):
    "A VOC root in tmp_path made of symlinks to the shared sample, with our own lists and a subset of SegmentationClass."
    root = tmp_path/'VOC2012'
    for d in ['JPEGImages', 'SegmentationClassAug'] + (['Annotations'] if xml else []):
        (root/d).mkdir(parents=True)
        for f in (VOC/d).iterdir(): (root/d/f.name).symlink_to(f)
    (root/'SegmentationClass').mkdir()
    for i in (seg_ids if seg_ids is not None else [f.stem for f in (VOC/'SegmentationClass').iterdir()]):
        (root/'SegmentationClass'/f'{i}.png').symlink_to(VOC/'SegmentationClass'/f'{i}.png')
    seg = root/'ImageSets'/'Segmentation'; seg.mkdir(parents=True)
    (seg/'train.txt').write_text('\n'.join(train if train is not None else ids('train')) + '\n')
    (seg/'val.txt').write_text('\n'.join(val if val is not None else ids('val')) + '\n')
    return root


# ---------------------------------------------------------------- VOC

@needs_voc
def test_voc_splits_and_labels():
    train, val = VOCSource(VOC, 'train'), VOCSource(VOC, 'val')
    assert (len(train), len(val), len(VOCSource(VOC, 'trainval'))) == (16, 16, 32)
    assert train.names == ids('train') and not set(train.names) & set(val.names)
    assert train.classes == VOC_CLASSES[1:] and train.num_classes == 21
    both = VOCSource(VOC, 'trainval')
    for n in both.names:
        lab = both.labels(n)
        assert lab.dtype == np.float32 and lab.shape == (20,) and lab.sum() >= 1
        assert both.label_origin(n) == ('xml' if n in XML_IDS else 'mask')
        m = both.mask(n)
        assert m.dtype == np.uint8 and m.shape == both.image(n).shape[:2]
        # for the sample, the XML objects and the mask classes agree
        np.testing.assert_array_equal(lab, labels_from_mask(m, 20))
    names = lambda n: [both.classes[k] for k in np.flatnonzero(both.labels(n))]
    assert names('2007_000032') == ['aeroplane', 'person']
    assert names('2007_000039') == ['tvmonitor'] and names('2007_000042') == ['train']


@needs_voc
def test_voc_xml_includes_difficult_and_label_source(tmp_path):
    root = fake_voc(tmp_path)
    xml = root/'Annotations'/'2007_000039.xml'
    text = (VOC/'Annotations'/'2007_000039.xml').read_text()
    xml.unlink()
    xml.write_text(text.replace('</annotation>', '<object><name>dog</name><difficult>1</difficult></object>\n'
                                '<object><name>person</name><part><name>head</name></part></object></annotation>'))
    src = VOCSource(root, 'train')
    got = [src.classes[k] for k in np.flatnonzero(src.labels('2007_000039'))]
    assert got == ['dog', 'person', 'tvmonitor']          # difficult objects count, part names do not
    src_m = VOCSource(root, 'train', label_source='mask')
    assert src_m.label_origin('2007_000039') == 'mask'
    assert [src_m.classes[k] for k in np.flatnonzero(src_m.labels('2007_000039'))] == ['tvmonitor']
    (root/'Annotations'/'2007_000032.xml').unlink(); (root/'Annotations'/'2007_000032.xml').write_text('<annotation><obj')
    with pytest.raises(SeamError, match='2007_000032.xml'): VOCSource(root, 'train').labels('2007_000032')
    with pytest.raises(SeamError, match='label_source'): VOCSource(root, 'train', label_source='csv')


@needs_voc
def test_voc_labels_from_mask_without_xml(tmp_path):
    root = fake_voc(tmp_path, xml=False)
    src = VOCSource(root, 'train')
    for n in src.names[:6]:
        assert src.label_origin(n) == 'mask'
        np.testing.assert_array_equal(src.labels(n), labels_from_mask(load_mask(VOC/'SegmentationClass'/f'{n}.png'), 20))


@needs_voc
def test_voc_train_aug(tmp_path):
    with pytest.raises(SeamError, match='sbd_list'): VOCSource(VOC, 'train_aug')
    # SBD ids overlapping VOC val are dropped; VOC train is kept
    sbd = tmp_path/'sbd.txt'; sbd.write_text('\n'.join(ids('val')[:5] + ids('train')[:3]) + '\n')
    assert VOCSource(VOC, 'train_aug', sbd_list=sbd).names == sorted(ids('train'))
    with pytest.raises(SeamError, match='train_aug'): VOCSource(VOC, 'train', sbd_list=sbd)
    # a smaller VOC train: the union brings SBD-only ids in; their masks come from SegmentationClassAug
    train, extra = ids('train')[:10], ids('train')[10:]
    root = fake_voc(tmp_path, train=train, seg_ids=train + ids('val'))
    sbd.write_text('\n'.join(extra + ids('val')[:4] + train[:2]) + '\n')
    aug = VOCSource(root, 'train_aug', sbd_list=sbd)
    assert aug.names == sorted(train + extra) and not set(aug.names) & set(ids('val'))
    assert aug.mask_path(extra[0]).parent.name == 'SegmentationClassAug'
    assert aug.mask_path(train[0]).parent.name == 'SegmentationClass'
    assert aug.mask(extra[0]).shape == aug.image(extra[0]).shape[:2]
    # a ready train_aug.txt in the original's path format is used when no sbd_list is given
    (root/'ImageSets'/'Segmentation'/'train_aug.txt').write_text(
        ''.join(f'/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n' for i in extra))
    assert VOCSource(root, 'train_aug').names == extra
    # ids whose images are missing are all reported
    sbd.write_text('2011_999998\n2011_999999\n')
    with pytest.raises(SeamError, match='2 image.*2011_999998.jpg.*2011_999999.jpg'): VOCSource(root, 'train_aug', sbd_list=sbd)


@needs_voc
def test_voc_bad_inputs(tmp_path):
    with pytest.raises(SeamError, match='JPEGImages'): VOCSource(tmp_path)
    with pytest.raises(SeamError, match='available'): VOCSource(VOC, 'nosuchsplit')
    with pytest.raises(SeamError, match='not found'): VOCSource(VOC, 'train_aug', sbd_list=tmp_path/'missing.txt')
    with pytest.raises(SeamError, match='mask folder'): VOCSource(VOC, 'train', mask_dir=tmp_path/'nope')
    # mask_dir: e.g. pseudo labels; out-of-range values are refused with the file name
    md = tmp_path/'pseudo'; md.mkdir()
    n = ids('train')[0]
    h, w = load_image(VOC/'JPEGImages'/f'{n}.jpg').shape[:2]
    bad = np.zeros((h, w), np.uint8); bad[0, 0] = 30
    label_to_pil(bad).save(md/f'{n}.png')
    src = VOCSource(VOC, 'train', mask_dir=md, label_source='mask')
    assert src.mask(ids('train')[1]) is None
    with pytest.raises(SeamError, match=f'{n}.png.*30'): src.mask(n)
    custom = tmp_path/'mylist.txt'; custom.write_text(f'{n}\n\n{n}\n')
    assert VOCSource(VOC, str(custom)).names == [n]
    (tmp_path/'e.txt').write_text('\n')
    with pytest.raises(SeamError, match='empty'): read_id_list(tmp_path/'e.txt')


@needs_voc
def test_segdataset_on_voc():
    name, img, mask = SegDataset(VOCSource(VOC, 'val'))[0]
    assert name == ids('val')[0] and img.dtype == np.uint8 and img.shape[:2] == mask.shape


# ---------------------------------------------------------------- FolderSource

@pytest.fixture
def folder(tmp_path):
    d = tmp_path/'images'; (d/'sub').mkdir(parents=True)
    for i, f in enumerate(['a.jpg', 'b.png', 'sub/c.png']):
        Image.new('RGB', (8 + i, 6), (i*40, 10, 200)).save(d/f)
    return d


def test_folder_source_ok(folder, tmp_path):
    csv = tmp_path/'l.csv'
    csv.write_text('image,labels\na.jpg,zebra;cat\nb.png,cat  dog\nsub/c.png,\n')
    src = FolderSource(folder, csv)
    assert src.classes == ('cat', 'dog', 'zebra') and src.num_classes == 4
    assert src.names == ['a', 'b', 'sub/c']
    np.testing.assert_array_equal(src.label_matrix(), [[1, 0, 1], [1, 1, 0], [0, 0, 0]])
    assert src.image('sub/c').shape == (6, 10, 3) and src.mask('a') is None
    # explicit classes (any number, in the given order), header case/BOM/extra columns tolerated, masks
    csv.write_text('\ufeffImage,Labels,note\na.jpg,cat,x\nb.png,dog,y\n')
    md = tmp_path/'masks'; md.mkdir()
    label_to_pil(np.full((6, 9), 2, np.uint8)).save(md/'b.png')
    src = FolderSource(folder, csv, classes=['dog', 'cat', 'owl', 'emu', 'yak'], mask_dir=md)
    assert src.num_classes == 6 and src.labels('a').tolist() == [0, 1, 0, 0, 0]
    assert src.mask('b').max() == 2 and src.mask('a') is None
    name, img, mask = SegDataset(src)[1]
    assert name == 'b' and mask.shape == img.shape[:2]
    with pytest.raises(SeamError, match="no mask for image 'a'"): SegDataset(src)[0]
    x, y = ClsDataset(src)[0]
    assert x.shape == (3, 6, 8) and y.tolist() == [0, 1, 0, 0, 0]


def test_folder_source_errors_listed_together(folder, tmp_path):
    csv = tmp_path/'l.csv'
    csv.write_text('image,labels\na.jpg,cat;dgo\nmissing1.jpg,dog\nb.png,bird cat\nmissing2.png,cat\n')
    with pytest.raises(SeamError) as e: FolderSource(folder, csv, classes=('cat', 'dog'))
    msg = str(e.value)
    assert '4 problem' in msg and 'l.csv' in msg and '\n' not in msg
    for bit in ["'dgo' (line 2)", 'missing1.jpg (line 3)', "'bird' (line 4)", 'missing2.png (line 5)', 'known classes: cat, dog']:
        assert bit in msg, bit
    # long lists are capped
    csv.write_text('image,labels\n' + ''.join(f'x{i}.jpg,cat\n' for i in range(30)))
    with pytest.raises(SeamError, match=r'30 problem.*x19\.jpg.*and 10 more') as e: FolderSource(folder, csv)
    assert 'x20.jpg' not in str(e.value)


def test_folder_source_bad_files(folder, tmp_path):
    csv = tmp_path/'l.csv'
    with pytest.raises(SeamError, match='not found'): FolderSource(folder, csv)
    csv.write_text('file,classes\na.jpg,cat\n')
    with pytest.raises(SeamError, match="'image' and 'labels'"): FolderSource(folder, csv)
    csv.write_text('image,labels\n')
    with pytest.raises(SeamError, match='no images'): FolderSource(folder, csv)
    csv.write_text('image,labels\na.jpg,cat\na.png,cat\n')
    with pytest.raises(SeamError, match="duplicate image name 'a'"): FolderSource(folder, csv)
    csv.write_text('image,labels\na.jpg,cat\n')
    with pytest.raises(SeamError, match='image folder'): FolderSource(tmp_path/'nope', csv)
    with pytest.raises(SeamError, match='background'): FolderSource(folder, csv, classes=['background', 'cat'])
    (folder/'a.jpg').write_bytes(b'\xff\xd8\xff\xe0garbage')          # listed but corrupt: fails on read
    src = FolderSource(folder, csv)
    with pytest.raises(SeamError, match='a.jpg'): src.image('a')


# ---------------------------------------------------------------- robust loading

def _jpeg_bytes(arr, **kw):
    b = io.BytesIO(); Image.fromarray(arr).save(b, format='JPEG', **kw); return b.getvalue()


def test_load_image_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 1]).save(tmp_path/'g.png')
    np.testing.assert_array_equal(load_image(tmp_path/'g.png'), np.repeat(rgb[..., 1:2], 3, 2))
    Image.fromarray(rgb[..., 1]).save(tmp_path/'g.jpg')
    assert load_image(tmp_path/'g.jpg').shape == (9, 11, 3)
    a = np.dstack([rgb, np.full((9, 11), 255, np.uint8)]); a[2, 3, 3] = 0; a[4, 4, 3] = 128
    Image.fromarray(a, 'RGBA').save(tmp_path/'a.png')
    out = load_image(tmp_path/'a.png')
    assert out[2, 3].tolist() == [255, 255, 255]                     # transparent -> white
    assert np.abs(out[4, 4].astype(int) - (rgb[4, 4].astype(int) + 255)/2).max() <= 1   # half alpha -> halfway to white
    np.testing.assert_array_equal(out[0], rgb[0])
    Image.fromarray(np.dstack([rgb[..., 0], a[..., 3]]), 'LA').save(tmp_path/'la.png')
    assert load_image(tmp_path/'la.png')[2, 3].tolist() == [255, 255, 255]
    Image.new('CMYK', (5, 4), (0, 0, 255, 0)).save(tmp_path/'c.jpg')   # CMYK yellow
    y = load_image(tmp_path/'c.jpg')
    assert y.shape == (4, 5, 3) and y[..., 0].min() > 200 and y[..., 1].min() > 200 and y[..., 2].max() < 60
    Image.new('CMYK', (5, 4), (0, 0, 255, 0)).save(tmp_path/'c.tif')
    assert load_image(tmp_path/'c.tif').shape == (4, 5, 3)
    p = Image.fromarray(rgb).convert('P', palette=Image.ADAPTIVE, colors=16); p.save(tmp_path/'p.png')
    np.testing.assert_array_equal(load_image(tmp_path/'p.png'), np.asarray(p.convert('RGB')))
    p.info['transparency'] = 0; p.save(tmp_path/'pt.png', transparency=0)
    idx = np.asarray(p)
    assert (load_image(tmp_path/'pt.png')[idx == 0] == 255).all()
    Image.fromarray((np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)).save(tmp_path/'g16.png')
    g16 = load_image(tmp_path/'g16.png')
    assert g16.dtype == np.uint8 and g16[0, 0, 0] == 0 and g16[2, 3, 0] == round(55000/65535*255)
    Image.new('1', (3, 2), 1).save(tmp_path/'bw.png')
    assert load_image(tmp_path/'bw.png').tolist() == [[[255]*3]*3]*2
    Image.new('RGB', (1, 1), (1, 2, 3)).save(tmp_path/'one.jpg', quality=100)
    assert load_image(tmp_path/'one.jpg').shape == (1, 1, 3)
    Image.new('L', (1, 1), 7).save(tmp_path/'one.png')
    assert load_image(tmp_path/'one.png').tolist() == [[[7, 7, 7]]]


def test_load_image_broken_files(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = _jpeg_bytes(rgb)
    (tmp_path/'trunc.jpg').write_bytes(good[:len(good)//2])
    (tmp_path/'garbage.jpg').write_bytes(b'\xff\xd8\xff\xe0' + os.urandom(200))
    (tmp_path/'empty.png').write_bytes(b'')
    b = io.BytesIO(); Image.fromarray(rgb).save(b, format='PNG'); png = b.getvalue()
    (tmp_path/'trunc.png').write_bytes(png[:len(png)//2])
    (tmp_path/'text.png').write_text('hello')
    (tmp_path/'dir.png').mkdir()
    for f in ['trunc.jpg', 'garbage.jpg', 'empty.png', 'trunc.png', 'text.png', 'dir.png', 'absent.jpg']:
        with pytest.raises(SeamError, match=f.replace('.', r'\.')): load_image(tmp_path/f)
    with pytest.raises(SeamError, match='trunc.png'): load_mask(tmp_path/'trunc.png')
    from PIL import ImageFile
    assert not ImageFile.LOAD_TRUNCATED_IMAGES                          # we never switch it on globally


def test_load_mask(tmp_path):
    m = np.array([[0, 1, 20], [255, 5, 0]], np.uint8)
    label_to_pil(m).save(tmp_path/'p.png')
    np.testing.assert_array_equal(load_mask(tmp_path/'p.png', num_classes=21), m)   # palette index = label
    Image.fromarray(m, 'L').save(tmp_path/'l.png')
    np.testing.assert_array_equal(load_mask(tmp_path/'l.png'), m)
    with pytest.raises(SeamError, match=r'l\.png.*\[20\].*0\.\.6'): load_mask(tmp_path/'l.png', num_classes=7)
    Image.fromarray(np.stack([m]*3, -1)).save(tmp_path/'rgb.png')
    with pytest.raises(SeamError, match=r'rgb\.png.*RGB.*palette'): load_mask(tmp_path/'rgb.png')
    Image.fromarray(m.astype(np.uint16)).save(tmp_path/'m16.png')
    with pytest.raises(SeamError, match=r'm16\.png.*16'): load_mask(tmp_path/'m16.png')
    Image.fromarray(np.stack([m]*4, -1), 'RGBA').save(tmp_path/'rgba.png')
    with pytest.raises(SeamError, match='RGBA'): load_mask(tmp_path/'rgba.png')
    with pytest.raises(SeamError, match='not found'): load_mask(tmp_path/'none.png')


# ---------------------------------------------------------------- Shapes

def test_shapes_determinism_and_consistency():
    assert len(SHAPE_CLASSES) >= 6 and len(set(SHAPE_CLASSES)) == len(SHAPE_CLASSES)
    state = torch.get_rng_state(); np_state = np.random.get_state()[1].copy()
    for seed in range(60):
        img, mask, labels = make_shapes(seed)
        img2, mask2, labels2 = make_shapes(seed)
        np.testing.assert_array_equal(img, img2); np.testing.assert_array_equal(mask, mask2)
        np.testing.assert_array_equal(labels, labels2)
        assert img.dtype == np.uint8 and img.shape == (128, 128, 3) and mask.dtype == np.uint8
        assert labels.dtype == np.float32 and labels.shape == (len(SHAPE_CLASSES),)
        present = set(np.unique(mask).tolist()) - {0, 255}
        assert present == set((np.flatnonzero(labels) + 1).tolist()) and present
        assert set(np.unique(mask).tolist()) <= set(range(len(SHAPE_CLASSES) + 1)) | {255}
    assert torch.equal(torch.get_rng_state(), state) and (np.random.get_state()[1] == np_state).all()
    img, mask, labels = make_shapes(3, size=64)
    assert img.shape == (64, 64, 3) and mask.shape == (64, 64)
    with pytest.raises(SeamError): make_shapes(0, size=8)


def test_shapes_colour_carries_no_class():
    "The mean colour of an object does not predict its class: every class appears in many hues."
    hues = {k: set() for k in range(1, len(SHAPE_CLASSES) + 1)}
    for seed in range(150):
        img, mask, _, info = make_shapes(seed, return_info=True)
        for k in np.unique(mask):
            if 0 < k < 255:
                c = img[mask == k].mean(0)
                hues[int(k)].add(int(np.argmax(c)) * 10 + int(np.argmin(c)))
    assert all(len(h) >= 4 for h in hues.values()), hues


def test_shapes_source():
    src = ShapesSource(6, size=32, seed=100)
    assert src.names[0] == 'shapes_000100' and len(src) == 6 and src.num_classes == len(SHAPE_CLASSES) + 1
    np.testing.assert_array_equal(src.mask('shapes_000103'), make_shapes(103, 32)[1])
    x, y = ClsDataset(src)[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), make_shapes(102, 32)[2])


# ---------------------------------------------------------------- transforms

def test_transforms_keep_mask_aligned():
    rng = np.random.default_rng(0)
    # blocky image: content is constant on 16x16 blocks, so resizing keeps block interiors exact
    blocks = rng.integers(0, 200, (3, 5, 3), dtype=np.uint8)
    img = np.kron(blocks, np.ones((16, 16, 1), np.uint8))                    # 48 x 80
    mask = img[..., 0].copy()                                                # the mask IS the image content
    for s in range(25):
        t = Compose([RandomResizeLong(80, 160), RandomHFlip(), RandomCrop(96)])
        out, m = t(img, mask, rng=s)
        assert out.shape == (96, 96, 3) and m.shape == (96, 96)
        # pixels whose 9x9 neighbourhood in the mask is one block (beyond the reach of the bicubic kernel):
        # the image must show that block's value there
        interior = np.ones_like(m, bool)
        for dy in range(-4, 5):
            for dx in range(-4, 5): interior &= np.roll(m, (dy, dx), (0, 1)) == m
        interior[:4] = interior[-4:] = False; interior[:, :4] = interior[:, -4:] = False
        interior &= m != 255
        assert interior.sum() > 100
        err = np.abs(out[..., 0].astype(int) - m.astype(int))[interior]
        assert err.max() <= 3, (s, err.max())
    # exact check without resampling, after normalisation: padding is 0 in the image, 255 in the mask
    for s in range(25):
        x, m = Compose([RandomHFlip(), Normalize(), RandomCrop(80), ToTensor()])(img, mask, rng=s)
        assert x.dtype == torch.float32 and m.dtype == torch.int64
        m = m.numpy(); valid = m != 255
        np.testing.assert_array_equal(denormalize(x)[..., 0][valid], m[valid])
        assert valid.sum() == 48*80 and (x.numpy()[:, ~valid] == 0).all()
    # larger than the crop: a true window of the flipped or plain image
    big = rng.integers(0, 255, (120, 130, 3), dtype=np.uint8)
    out, m = Compose([RandomHFlip(p=1.), RandomCrop(64)])(big, big[..., 2].copy(), rng=1)
    np.testing.assert_array_equal(out[..., 2], m)
    assert (m != 255).all()


def test_train_transform_pipeline():
    t = train_transform(96, (100, 120))
    names = [type(x).__name__ for x in t.transforms]
    assert names == ['RandomResizeLong', 'RandomHFlip', 'ColorJitter', 'Normalize', 'RandomCrop', 'ToTensor']
    assert [type(x).__name__ for x in train_transform(64, None, jitter=False).transforms] == \
        ['RandomHFlip', 'Normalize', 'RandomCrop', 'ToTensor']
    img = make_shapes(0)[0]
    x, m = t(img, rng=0)
    assert x.shape == (3, 96, 96) and m is None
    seed_everything(3); a = t(img)[0]
    seed_everything(3); b = t(img)[0]
    c = t(img)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    j = ColorJitter(0, 0, 0, 0)(img, rng=0)[0]
    np.testing.assert_array_equal(j, img)                                    # zero jitter is the identity
    r, _ = RandomResizeLong(50, 50)(np.zeros((30, 10, 3), np.uint8), rng=0)
    assert r.shape == (50, 17, 3)                                             # long side is the height here


def _worker_batches(seed, workers):
    seed_everything(seed)
    ds = ClsDataset(ShapesSource(8, size=32), train_transform(32, (24, 48)))
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers)
    return torch.cat([x for x, _ in dl])


def test_dataloader_workers_reproducible_and_distinct():
    a, b = _worker_batches(0, 2), _worker_batches(0, 2)
    assert torch.equal(a, b)                                                  # reproducible under seed_everything
    assert not torch.equal(_worker_batches(1, 2), a)
    # the same image in two different epochs gets different augmentations
    ds = ClsDataset(ShapesSource(1, size=32), train_transform(32, (24, 48)))
    assert not torch.equal(ds[0][0], ds[0][0])


def test_multiscale_views():
    img = np.random.default_rng(0).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    views = multiscale_views(img)
    assert [tuple(v.shape) for v in views] == [(2, 3, 15, 20), (2, 3, 30, 41), (2, 3, 45, 62), (2, 3, 60, 82)]
    for v in views:
        assert v.dtype == torch.float32 and torch.equal(v[1], v[0].flip(-1))
    np.testing.assert_array_equal(denormalize(views[1][0]), img)
    np.testing.assert_array_equal(denormalize(views[1][1]), img[:, ::-1])
    assert torch.equal(views[1][0], normalize_image(img))
    one = multiscale_views(img, scales=(1.0, 0.25), flip=False)
    assert [tuple(v.shape) for v in one] == [(1, 3, 30, 41), (1, 3, 8, 10)]
    tiny = multiscale_views(np.zeros((1, 1, 3), np.uint8))
    assert [tuple(v.shape) for v in tiny] == [(2, 3, 1, 1), (2, 3, 1, 1), (2, 3, 2, 2), (2, 3, 2, 2)]
