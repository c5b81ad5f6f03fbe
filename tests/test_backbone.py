"""Tests for seam_nb.backbones and seam_nb.weights: architecture fidelity, the MXNet reader, weight loading and its errors."""
import json, re, struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from seam_nb.core import SeamError
from seam_nb.backbones import (ResNet38, ResNet50Dilated, TinyBackbone, make_backbone, read_keys_tsv, state_dict_keys,
                               stage_geometry)
from seam_nb.weights import read_mxnet_params, load_weights, mxnet_resnet38_name

SHARED = Path(__file__).resolve().parents[1].parent/'shared'
FIXTURES = Path(__file__).resolve().parent/'fixtures'
torch.set_num_threads(min(2, torch.get_num_threads()))


# --- a minimal MXNet NDArray writer, independent of the reader under test ---------------------------------------
FLAGS = {'float32': 0, 'float64': 1, 'float16': 2, 'uint8': 3, 'int32': 4, 'int8': 5, 'int64': 6}

def write_params(path, arrays, layout='legacy', sparse_zero_over=None):
    """Write {name: ndarray or (shape, dtype, fill)} in one record layout: legacy, v1, v2 or v3.
    Arrays given as (shape, dtype, 0.0) larger than `sparse_zero_over` elements are written as holes (zeros)."""
    magic = {'v1': 0xF993FAC8, 'v2': 0xF993FAC9, 'v3': 0xF993FACA}
    with open(path, 'wb') as f:
        f.write(struct.pack('<QQQ', 0x112, 0, len(arrays)))
        for a in arrays.values():
            if isinstance(a, tuple): shape, dtype, fill = a
            else: a = np.require(a, requirements='C'); shape, dtype, fill = a.shape, a.dtype.name, None
            nd = len(shape)
            if layout == 'legacy': f.write(struct.pack(f'<I{nd}I', nd, *shape))
            elif layout == 'v1': f.write(struct.pack(f'<II{nd}q', magic['v1'], nd, *shape))
            else: f.write(struct.pack(f'<Iii{nd}q', magic[layout], 0, nd, *shape))
            f.write(struct.pack('<iii', 1, 0, FLAGS[dtype]))
            n = int(np.prod(shape, dtype=np.int64))
            if fill is None: f.write(a.astype(np.dtype(dtype).newbyteorder('<')).tobytes())
            elif fill == 0 and sparse_zero_over is not None and n > sparse_zero_over: f.seek(n * np.dtype(dtype).itemsize, 1)
            else: f.write(np.full(n, fill, np.dtype(dtype).newbyteorder('<')).tobytes())
        f.write(struct.pack('<Q', len(arrays)))
        for name in arrays:
            b = name.encode(); f.write(struct.pack('<Q', len(b)) + b)
    return path


def mx_name(key):
    "ademxapp name of one original ResNet-38 key (written from the naming scheme, independently of the package)."
    parts = key.split('.')
    bn = {'weight': ('arg', 'gamma'), 'bias': ('arg', 'beta'), 'running_mean': ('aux', 'moving_mean'),
          'running_var': ('aux', 'moving_var')}
    if parts[0] == 'conv1a': return 'arg:conv1a_weight'
    if parts[0] == 'bn7': p, s = bn[parts[1]]; return f'{p}:bn7_{s}'
    block, layer, param = parts
    stage, idx = re.fullmatch(r'b(\d)(?:_(\d))?', block).groups()
    bname = f'{stage}a' if idx is None else f'{stage}b{idx}'
    kind, branch = layer.split('_', 1)
    if kind == 'conv': return f'arg:res{bname}_{branch}_weight'
    p, s = bn[param]
    return f'{p}:bn{bname}_{branch}_{s}'


@pytest.fixture(scope='module')
def r38():
    return ResNet38()


def reference(name):
    "A key manifest of the original code, shipped with the tests (tests/fixtures), so these tests run in every clone."
    return read_keys_tsv(FIXTURES/name)


# --- architecture -------------------------------------------------------------------------------------------------
def test_resnet38_keys_equal_reference(r38):
    ref = reference('resnet38d.keys.tsv')
    ours = state_dict_keys(r38)
    assert len(ours) == len(ref) == 228
    for a, b in zip(ours, ref): assert a == b


def test_resnet38_geometry_and_dropout(r38):
    assert stage_geometry(r38)[-1]['stride'] == 8
    assert r38.b5.conv_branch2b1.dilation == (2, 2) and r38.b5.conv_branch2a.dilation == (1, 1)
    assert r38.b6.conv_branch2b1.dilation == (4, 4) and r38.b7.conv_branch2b1.dilation == (4, 4)
    assert (r38.b6.dropout_2b1.p, r38.b7.dropout_2b2.p) == (0.3, 0.5)


def test_resnet38_freeze_policy_survives_train(r38):
    r38.train()
    for m in (r38.conv1a, r38.b2, r38.b2_1, r38.b2_2):
        assert not any(p.requires_grad for p in m.parameters())
    bns = [m for m in r38.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    assert r38.b3.conv_branch2a.weight.requires_grad and r38.b7.conv_branch1.weight.requires_grad
    r38.eval(); r38.train(True)
    assert not r38.bn7.training


def test_resnet50_and_tiny_contract():
    r50 = ResNet50Dilated().eval()
    with torch.no_grad(): f = r50.forward_features(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in f.items()} == dict(low=(1, 512, 8, 8), mid=(1, 1024, 8, 8), out=(1, 2048, 8, 8))
    r50.train()
    assert not r50.layer1[0].conv1.weight.requires_grad and not r50.bn1.training
    tiny = TinyBackbone(width=8).train()
    f = tiny.forward_features(torch.randn(2, 3, 128, 128))
    assert f['out'].shape == (2, tiny.out_channels, 16, 16) and f['low'].shape[1] == tiny.low_channels
    assert tiny.bn5.training and all(p.requires_grad for p in tiny.parameters())
    with pytest.raises(SeamError, match='unknown backbone'): make_backbone('vgg')


def test_resnet50_weights_only_from_local_file(tmp_path):
    sd = ResNet50Dilated().state_dict()
    sd.update({'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)})   # a torchvision-style file
    sd['conv1.weight'] = torch.full_like(sd['conv1.weight'], 0.5)
    torch.save(sd, tmp_path/'r50.pth')
    m = ResNet50Dilated(weights=tmp_path/'r50.pth')
    assert torch.all(m.conv1.weight == 0.5)
    assert m.load_report.unexpected == ['fc.weight', 'fc.bias']
    with pytest.raises(SeamError, match='no such file'): ResNet50Dilated(weights=tmp_path/'absent.pth')


# --- MXNet reader -------------------------------------------------------------------------------------------------
def test_mxnet_reader_matches_manifest():
    man = SHARED/'mxnet_params/MANIFEST.json'
    if not man.exists(): pytest.skip('shared mxnet_params not available')
    manifest = json.loads(man.read_text())
    assert set(manifest) == {'det1-0001.params', 'gender-age-model-0000.params'}
    for fname, info in manifest.items():
        got = read_mxnet_params(SHARED/'mxnet_params'/fname)
        assert set(got) == set(info['arrays'])
        assert any(k.startswith('arg:') for k in got)
        for k, want in info['arrays'].items():
            assert list(got[k].shape) == want['shape'] and got[k].dtype.name == want['dtype'], k
            assert np.isclose(got[k].astype(np.float64).sum(), want['sum'], rtol=1e-9, atol=1e-9), k
    assert sum(k.startswith('aux:') for k in read_mxnet_params(SHARED/'mxnet_params/gender-age-model-0000.params')) == 58


@pytest.mark.parametrize('layout', ['legacy', 'v1', 'v2', 'v3'])
def test_mxnet_layouts_round_trip(tmp_path, layout):
    arrays = {'arg:w': np.random.RandomState(0).randn(4, 3, 2, 2).astype(np.float32),
              'aux:v': np.arange(5, dtype=np.float64), 'arg:h': np.ones((2, 3), np.float16), 'arg:i': np.arange(3, dtype=np.int64)}
    if layout == 'v3': arrays['arg:scalar'] = np.array(2.5, np.float32)   # NumPy-shape semantics: ndim 0 is a scalar
    got = read_mxnet_params(write_params(tmp_path/'x.params', arrays, layout))
    assert list(got) == list(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and np.array_equal(got[k], a)


def test_mxnet_errors(tmp_path):
    arrays = {'arg:w': np.ones((64, 64), np.float32), 'arg:b': np.ones(64, np.float32)}
    raw = write_params(tmp_path/'ok.params', arrays, 'v2').read_bytes()
    for cut in (4, 30, 200, len(raw) - 3):
        (tmp_path/'cut.params').write_bytes(raw[:cut])
        with pytest.raises(SeamError, match='truncated'): read_mxnet_params(tmp_path/'cut.params')
    (tmp_path/'sparse.params').write_bytes(raw[:24] + struct.pack('<Ii', 0xF993FAC9, 1) + raw[32:])
    with pytest.raises(SeamError, match='row_sparse'): read_mxnet_params(tmp_path/'sparse.params')
    (tmp_path/'junk.params').write_bytes(b'\x00' * 64)
    with pytest.raises(SeamError, match='not an MXNet NDArray file'): read_mxnet_params(tmp_path/'junk.params')
    (tmp_path/'tail.params').write_bytes(raw + b'xx')
    with pytest.raises(SeamError, match='unexpected bytes'): read_mxnet_params(tmp_path/'tail.params')


def test_truncated_params_into_resnet38_is_one_clear_error(tmp_path, r38):
    names = [mx_name(k) for k, _, _ in state_dict_keys(r38) if not k.endswith('num_batches_tracked')][:6]
    raw = write_params(tmp_path/'r38.params', {n: np.zeros(3, np.float32) for n in names}).read_bytes()
    (tmp_path/'r38_cut.params').write_bytes(raw[:len(raw) // 2])
    before = r38.conv1a.weight.clone()
    with pytest.raises(SeamError, match=r'r38_cut\.params: truncated'): load_weights(r38, tmp_path/'r38_cut.params')
    assert torch.equal(r38.conv1a.weight, before)


def test_mxnet_resnet38_full_mapping(tmp_path, r38):
    "A synthetic ImageNet ResNet-38 file with every ademxapp name: every backbone key is covered, right shape, right value."
    ref = reference('resnet38d.keys.tsv')
    arrays, expect = {}, {}
    for i, (key, shape, dtype) in enumerate(ref):
        if key.endswith('num_batches_tracked'): continue
        n = int(np.prod(shape))
        fill = float(i + 1) if n <= 4096 else 0.0           # small tensors get a tell-tale value, large ones zeros
        arrays[mx_name(key)] = (shape, 'float32', fill); expect[key] = fill
    arrays['arg:linear1000_weight'] = ((1000, 4096), 'float32', 0.0)
    arrays['arg:linear1000_bias'] = ((1000,), 'float32', 0.0)
    path = write_params(tmp_path/'ilsvrc-cls_rna-a1_cls1000_ep-0001.params', arrays, 'legacy', sparse_zero_over=4096)
    got = read_mxnet_params(path)
    assert {mxnet_resnet38_name(n) for n in got} - {None} == set(expect)
    report = load_weights(r38, path)
    assert report.format == 'mxnet'
    assert set(report.loaded) == set(expect)
    assert sorted(report.unexpected) == ['arg:linear1000_bias', 'arg:linear1000_weight']
    assert report.missing == [] and len(report.filled) == sum(k.endswith('num_batches_tracked') for k, _, _ in ref)
    sd = r38.state_dict()
    for key, fill in expect.items():
        assert torch.all(sd[key] == fill), key


# --- .pth loading -------------------------------------------------------------------------------------------------
def test_other_architecture_is_refused_and_nothing_loads(tmp_path, r38):
    torch.save(TinyBackbone(width=16).state_dict(), tmp_path/'tiny.pth')
    before = r38.b3.conv_branch2a.weight.clone()
    with pytest.raises(SeamError) as e: load_weights(r38, tmp_path/'tiny.pth')
    msg = str(e.value)
    assert 'tiny.pth does not fit ResNet38' in msg and 'missing: ' in msg and 'wrong shape: conv1a.weight' in msg
    assert re.search(r'\d+ missing, \d+ unexpected, \d+ with the wrong shape', msg) and 'more' in msg
    assert '\n' not in msg
    assert torch.equal(r38.b3.conv_branch2a.weight, before)


def test_pickles_and_non_checkpoints_refused(tmp_path):
    class Payload:
        def __reduce__(self): return (exec, ('raise SystemExit(3)',))
    torch.save({'model': {'w': Payload()}}, tmp_path/'evil.pth')
    tiny = TinyBackbone(width=4)
    with pytest.raises(SeamError, match='refused to load'): load_weights(tiny, tmp_path/'evil.pth')
    torch.save([torch.zeros(1)], tmp_path/'list.pth')
    with pytest.raises(SeamError, match='not a state dict'): load_weights(tiny, tmp_path/'list.pth')
    torch.save({'a': 1, 'b': torch.zeros(1)}, tmp_path/'mixed.pth')
    with pytest.raises(SeamError, match='not tensors'): load_weights(tiny, tmp_path/'mixed.pth')
    (tmp_path/'image.pth').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 100)
    with pytest.raises(SeamError, match='not a readable PyTorch checkpoint'): load_weights(tiny, tmp_path/'image.pth')


def test_legacy_torch_file_without_counters_and_module_prefix(tmp_path):
    src = TinyBackbone(width=4)
    sd = {f'module.{k}': v + 1 for k, v in src.state_dict().items() if not k.endswith('num_batches_tracked')}
    torch.save(sd, tmp_path/'old.pth', _use_new_zipfile_serialization=False)   # the PyTorch 0.4 container
    dst = TinyBackbone(width=4)
    rep = load_weights(dst, tmp_path/'old.pth')
    assert len(rep.filled) == sum(isinstance(m, nn.BatchNorm2d) for m in dst.modules())
    assert torch.equal(dst.conv1a.weight, src.conv1a.weight + 1)
    assert 'tensors loaded from old.pth' in repr(rep)
