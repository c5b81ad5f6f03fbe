"""Tests for seam_nb.model: SEAMNet's keys, forward contract, freezing, parameter groups and checkpoint loading."""
import copy, re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seam_nb.core import SeamError
from seam_nb.backbones import read_keys_tsv, state_dict_keys
from seam_nb.weights import load_weights
from seam_nb.model import SEAMNet
from test_backbone import write_params, mx_name   # the test-side MXNet writer and ademxapp naming

FIXTURES = Path(__file__).resolve().parent/'fixtures'
HEAD = ['fc8.weight', 'f8_3.weight', 'f8_4.weight', 'f9.weight']
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope='module')
def seam38():
    return SEAMNet('resnet38')


def test_state_dict_equals_reference_line_by_line(seam38):
    p = FIXTURES/'resnet38_SEAM.keys.tsv'
    ref, ours = read_keys_tsv(p), state_dict_keys(seam38)
    assert len(ours) == len(ref) == 232
    for a, b in zip(ours, ref): assert a == b       # name, shape, dtype, in order
    assert not any(k.startswith('backbone.') for k in seam38.state_dict())


def test_head_shapes_and_init(seam38):
    assert seam38.fc8.bias is None and seam38.fc8.weight.shape == (21, 4096, 1, 1)
    assert (seam38.f8_3.in_channels, seam38.f8_3.out_channels) == (512, 64)
    assert (seam38.f8_4.in_channels, seam38.f8_4.out_channels) == (1024, 128)
    assert (seam38.f9.in_channels, seam38.f9.out_channels) == (195, 192)
    bound = 4 * (6 / (195 + 192)) ** 0.5              # xavier uniform, gain 4
    assert seam38.f9.weight.abs().max() <= bound and seam38.f9.weight.abs().max() > 0.9 * bound
    assert isinstance(seam38.dropout7, nn.Dropout2d) and seam38.dropout7.p == 0.5
    assert seam38.num_classes == 21 and seam38.backbone_name == 'resnet38'


def test_freezing_and_param_groups(seam38):
    seam38.train()
    assert not any(m.training for m in seam38.modules() if isinstance(m, nn.BatchNorm2d))
    for name in ('conv1a', 'b2', 'b2_1', 'b2_2'):
        assert not any(p.requires_grad for p in getattr(seam38, name).parameters()), name
    groups = seam38.param_groups(0.01, 5e-4)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in seam38.modules())
    assert [len(g['params']) for g in groups] == [n_conv - 8 - 4, 0, 4, 0]
    assert [(g['lr'], g['weight_decay']) for g in groups] == [(0.01, 5e-4), (0.02, 0), (0.1, 5e-4), (0.2, 0)]
    ids = [id(p) for g in groups for p in g['params']]
    assert len(ids) == len(set(ids)) and all(p.requires_grad for g in groups for p in g['params'])
    assert {id(p) for p in groups[2]['params']} == {id(seam38.get_parameter(k)) for k in HEAD}
    seam38.eval()


def test_forward_shapes_resnet38_64px(seam38):
    seam38.eval()
    with torch.no_grad():
        cam, cam_pcm = seam38(torch.randn(1, 3, 64, 64))
        lo = seam38.forward_lowres(torch.randn(1, 3, 64, 64))
    assert cam.shape == cam_pcm.shape == (1, 21, 64, 64)
    assert lo[0].shape == lo[1].shape == (1, 21, 8, 8)


def test_resnet50_forward_and_groups():
    m = SEAMNet('resnet50').eval()
    with torch.no_grad(): cam, cam_pcm = m(torch.randn(1, 3, 64, 64))
    assert cam.shape == cam_pcm.shape == (1, 21, 64, 64)
    assert m.f8_3.in_channels == 512 and m.f8_4.in_channels == 1024 and m.fc8.in_channels == 2048
    groups = m.param_groups(0.01)
    n_conv = sum(isinstance(mm, nn.Conv2d) for mm in m.modules())
    assert [len(g['params']) for g in groups] == [n_conv - 11 - 4, 0, 4, 0]   # conv1 + 10 convs of layer1 frozen


def original_forward(m, x):
    "The original resnet38_SEAM forward arithmetic, as a test oracle."
    H, W = x.shape[-2:]
    d = m.backbone.forward_features(x)
    cam = m.fc8(m.dropout7(d['out']))
    n, c, h, w = cam.shape
    p = F.relu(cam.detach())
    p = F.relu(p - 1e-5) / (p.flatten(2).max(-1)[0].view(n, c, 1, 1) + 1e-5)
    p[:, 0] = 1 - p[:, 1:].max(1)[0]
    p[:, 1:][p[:, 1:] < p[:, 1:].max(1, keepdim=True)[0]] = 0
    f = torch.cat([F.interpolate(x, (h, w), mode='bilinear', align_corners=True),
                   F.relu(m.f8_3(d['low'])), F.relu(m.f8_4(d['mid']))], 1)
    f = m.f9(f).flatten(2); f = f / (f.norm(dim=1, keepdim=True) + 1e-5)
    aff = F.relu(f.transpose(1, 2) @ f); aff = aff / (aff.sum(1, keepdim=True) + 1e-5)
    rv = (p.flatten(2) @ aff).view(n, c, h, w)
    return [F.interpolate(t, (H, W), mode='bilinear', align_corners=True) for t in (cam, rv)]


def test_tiny_forward_matches_original_and_chunking():
    torch.manual_seed(0)
    m = SEAMNet('tiny', num_classes=7, width=8).eval()
    x = torch.randn(3, 3, 80, 96)
    with torch.no_grad():
        cam, cam_pcm = m(x)
        ref = original_forward(m, x)
        m.pcm_chunk = 7
        cam_c, pcm_c = m(x)
    assert cam.shape == cam_pcm.shape == (3, 7, 80, 96)
    assert torch.allclose(cam, ref[0], atol=1e-5) and torch.allclose(cam_pcm, ref[1], atol=1e-5)
    assert torch.allclose(pcm_c, cam_pcm, atol=1e-5)


def test_gradient_routing_and_tiny_groups():
    m = SEAMNet('tiny', num_classes=5, width=8).train()
    cam, cam_pcm = m(torch.randn(2, 3, 64, 64))
    cam_pcm.sum().backward()
    touched = {n.split('.')[0] for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {'f8_3', 'f8_4', 'f9'}
    groups = m.param_groups(0.1, 1e-4)
    n_bn = sum(isinstance(mm, nn.BatchNorm2d) for mm in m.modules())
    n_conv = sum(isinstance(mm, nn.Conv2d) for mm in m.modules())
    assert [len(g['params']) for g in groups] == [n_conv - 4 + n_bn, n_bn, 4, 0]
    assert m.bn5.training


def test_deepcopy_keeps_backbone_wiring():
    m = SEAMNet('tiny', num_classes=4, width=4).eval()
    twin = copy.deepcopy(m)
    assert twin.backbone.conv1a is twin.conv1a and twin.backbone.conv1a is not m.conv1a
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(): assert torch.allclose(m(x)[1], twin(x)[1])


def test_bad_arguments():
    with pytest.raises(SeamError, match='unknown backbone'): SEAMNet('alexnet')
    with pytest.raises(SeamError, match='>= 2'): SEAMNet('tiny', num_classes=1)


# --- checkpoints --------------------------------------------------------------------------------------------------
def test_author_checkpoint_without_counters_loads(tmp_path, seam38):
    sd = {k: (v.clone().fill_(0.125) if v.is_floating_point() else v) for k, v in seam38.state_dict().items()
          if not k.endswith('num_batches_tracked')}
    assert len(sd) == 232 - sum(isinstance(m, nn.BatchNorm2d) for m in seam38.modules())
    torch.save(sd, tmp_path/'resnet38_SEAM.pth', _use_new_zipfile_serialization=False)
    del sd
    rep = load_weights(seam38, tmp_path/'resnet38_SEAM.pth')
    assert rep.format == 'pytorch' and rep.missing == [] and rep.unexpected == []
    assert len(rep.loaded) + len(rep.filled) == 232
    assert torch.all(seam38.fc8.weight == 0.125) and torch.all(seam38.b4_3.conv_branch2a.weight == 0.125)


def test_imagenet_backbone_pth_keeps_head_at_init(tmp_path, seam38):
    head_before = {k: seam38.get_parameter(k).clone() for k in HEAD}
    sd = {k: v.clone().fill_(0.5) if v.is_floating_point() else v for k, v in seam38.state_dict().items()
          if not k.startswith(('fc8.', 'f8_3.', 'f8_4.', 'f9.'))}
    sd.update({'linear1000.weight': torch.zeros(1000, 4096), 'linear1000.bias': torch.zeros(1000)})
    torch.save(sd, tmp_path/'ilsvrc_r38.pth')
    del sd
    rep = load_weights(seam38, tmp_path/'ilsvrc_r38.pth')
    assert sorted(rep.missing) == sorted(HEAD) and rep.unexpected == ['linear1000.weight', 'linear1000.bias']
    assert 'kept at init (4)' in repr(rep) and 'ignored from file (2)' in repr(rep)
    for k in HEAD: assert torch.equal(seam38.get_parameter(k), head_before[k])
    assert torch.all(seam38.b7.conv_branch2b2.weight == 0.5)


def test_imagenet_mxnet_file_into_seamnet(tmp_path, seam38):
    keys = [k for k, _ in seam38.state_dict().items() if not k.endswith('num_batches_tracked') and k not in HEAD]
    arrays = {mx_name(k): (tuple(seam38.state_dict()[k].shape), 'float32', 0.0) for k in keys}
    arrays['arg:linear1000_weight'] = ((1000, 4096), 'float32', 0.0)
    arrays['arg:linear1000_bias'] = ((1000,), 'float32', 0.0)
    rep = load_weights(seam38, write_params(tmp_path/'r38.params', arrays, 'v2', sparse_zero_over=0))
    assert rep.format == 'mxnet' and set(rep.loaded) == set(keys)
    assert sorted(rep.missing) == sorted(HEAD) and len(rep.unexpected) == 2


def test_own_checkpoint_and_wrong_architectures(tmp_path, seam38):
    tiny = SEAMNet('tiny', num_classes=21, width=8)
    torch.save({'model': tiny.state_dict(), 'step': 10, 'config': {'backbone': 'tiny'}}, tmp_path/'ckpt.pth')
    assert load_weights(SEAMNet('tiny', num_classes=21, width=8), tmp_path/'ckpt.pth').format == 'checkpoint'
    before = seam38.b5.conv_branch2a.weight.clone()
    with pytest.raises(SeamError) as e: load_weights(seam38, tmp_path/'ckpt.pth')
    msg = str(e.value)
    assert 'does not fit SEAMNet(resnet38)' in msg and 'missing: ' in msg and 'wrong shape: ' in msg and 'unexpected: ' in msg
    assert re.search(r'(\d+) missing, (\d+) unexpected, (\d+) with the wrong shape', msg)
    r50 = SEAMNet('resnet50').state_dict()
    with pytest.raises(SeamError, match=r'missing: conv1a\.weight.*unexpected: conv1\.weight.*wrong shape: fc8\.weight'):
        load_weights(seam38, r50)
    assert torch.equal(seam38.b5.conv_branch2a.weight, before)
    with pytest.raises(SeamError, match=r'wrong shape: fc8\.weight \(file \(21, 64, 1, 1\) vs model \(7, 64, 1, 1\)\)'):
        load_weights(SEAMNet('tiny', num_classes=7, width=8), tmp_path/'ckpt.pth')
