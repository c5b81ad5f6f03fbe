"Checks of seam_nb.losses beyond the notebook: agreement with the original training step, equivariant fakes, gradients."
import pytest
import torch
import torch.nn.functional as F
from seam_nb.cam import max_norm
from seam_nb.equivariance import Rescale, HFlip, Rotate, Translate
from seam_nb.losses import (cls_loss, er_loss, ecr_loss, min_pool_loss, scale_er_loss, objective, max_onehot,
                            top_fraction_mean, label_mask)


def _original_step(cam1, cam_rv1, cam2, cam_rv2, fg_labels, scale=0.3):
    """The loss arithmetic of the original train_SEAM.py step (model outputs given), transcribed with its in-place
    updates; returns (loss, loss_cls, loss_er, loss_ecr) like the script."""
    def adaptive_min_pooling_loss(x):
        n, c, h, w = x.size()
        k = h * w // 4
        x = torch.max(x, dim=1)[0]
        y = torch.topk(x.view(n, -1), k=k, dim=-1, largest=False)[0]
        return torch.sum(F.relu(y)) / (k * n)

    def max_onehot_inplace(x):
        x_max = torch.max(x[:, 1:, :, :], dim=1, keepdim=True)[0]
        x[:, 1:, :, :][x[:, 1:, :, :] != x_max] = 0
        return x

    N = cam1.shape[0]
    label = torch.cat((torch.ones((N, 1)), fg_labels), dim=1).unsqueeze(2).unsqueeze(3)
    label1 = F.adaptive_avg_pool2d(cam1, (1, 1))
    loss_rvmin1 = adaptive_min_pooling_loss((cam_rv1 * label)[:, 1:, :, :])
    cam1 = F.interpolate(max_norm(cam1), scale_factor=scale, mode='bilinear', align_corners=True) * label
    cam_rv1 = F.interpolate(max_norm(cam_rv1), scale_factor=scale, mode='bilinear', align_corners=True) * label
    label2 = F.adaptive_avg_pool2d(cam2, (1, 1))
    loss_rvmin2 = adaptive_min_pooling_loss((cam_rv2 * label)[:, 1:, :, :])
    cam2 = max_norm(cam2) * label
    cam_rv2 = max_norm(cam_rv2) * label
    loss_cls1 = F.multilabel_soft_margin_loss(label1[:, 1:, :, :], label[:, 1:, :, :])
    loss_cls2 = F.multilabel_soft_margin_loss(label2[:, 1:, :, :], label[:, 1:, :, :])
    ns, cs, hs, ws = cam2.size()
    loss_er = torch.mean(torch.abs(cam1[:, 1:, :, :] - cam2[:, 1:, :, :]))
    cam1 = cam1.clone(); cam2 = cam2.clone()    # (the script writes into these tensors in place)
    cam1[:, 0, :, :] = 1 - torch.max(cam1[:, 1:, :, :], dim=1)[0]
    cam2[:, 0, :, :] = 1 - torch.max(cam2[:, 1:, :, :], dim=1)[0]
    tensor_ecr1 = torch.abs(max_onehot_inplace(cam2.detach().clone()) - cam_rv1)
    tensor_ecr2 = torch.abs(max_onehot_inplace(cam1.detach().clone()) - cam_rv2)
    k = int(cs * hs * ws * 0.2)
    loss_ecr = torch.mean(torch.topk(tensor_ecr1.view(ns, -1), k=k, dim=-1)[0]) + \
               torch.mean(torch.topk(tensor_ecr2.view(ns, -1), k=k, dim=-1)[0])
    loss_cls = (loss_cls1 + loss_cls2) / 2 + (loss_rvmin1 + loss_rvmin2) / 2
    return loss_cls + loss_er + loss_ecr, loss_cls, loss_er, loss_ecr


def _outputs(n=2, c=21, H=56, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    h = Rescale(0.3).output_size(H, H)[0]
    mk = lambda *s: torch.randn(*s, generator=g).requires_grad_(requires_grad)
    pos = lambda *s: torch.rand(*s, generator=g).requires_grad_(requires_grad)
    labels = (torch.rand(n, c - 1, generator=g) < 0.3).float()
    labels[:, 0] = 1
    return (mk(n, c, H, H), pos(n, c, H, H)), (mk(n, c, h, h), pos(n, c, h, h)), labels


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_seam_objective_equals_original_step(seed):
    out_x, out_tx, labels = _outputs(seed=seed)
    d = objective('seam', out_x, out_tx, labels)   # default transform: Rescale(0.3)
    loss, loss_cls, loss_er, loss_ecr = _original_step(out_x[0], out_x[1], out_tx[0], out_tx[1], labels)
    torch.testing.assert_close(d['total'], loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d['cls'] + d['min_pool'], loss_cls, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d['er'], loss_er, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d['ecr'], loss_ecr, atol=1e-6, rtol=1e-5)
    # and the same gradients for every input
    ours = torch.autograd.grad(d['total'], [*out_x, *out_tx])
    theirs = torch.autograd.grad(loss, [*out_x, *out_tx])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_ecr_sends_no_gradient_to_cams():
    out_x, out_tx, labels = _outputs(seed=4)
    loss = ecr_loss(out_x[0], out_x[1], out_tx[0], out_tx[1], labels)
    g_cx, g_px, g_ctx, g_ptx = torch.autograd.grad(loss, [out_x[0], out_x[1], out_tx[0], out_tx[1]], allow_unused=True)
    assert g_cx is None or g_cx.abs().sum() == 0
    assert g_ctx is None or g_ctx.abs().sum() == 0
    assert g_px.abs().sum() > 0 and g_ptx.abs().sum() > 0


def _pixel_model(x, w=torch.tensor([[0.3, -1.0, 0.5], [1.2, 0.4, -0.7], [-0.2, 0.9, 0.8]])):
    "A CAM computed from each pixel alone: exactly flip-equivariant."
    return torch.tanh(torch.einsum('kc,nchw->nkhw', w, x)) + 0.1


def _ramp_model(x):
    "Planar ramps at the input size: exactly equivariant to bilinear Rescale with align_corners=True."
    n, _, h, w = x.shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing='ij')
    return torch.stack([xx * 0, 2 + xx + 3 * yy, 1 + 2 * (1 - xx) + yy])[None].expand(n, 3, h, w)


def _const_model(x):
    "A CAM constant per channel (max_norm maps it to 0): trivially equivariant to anything."
    n, _, h, w = x.shape
    return torch.tensor([0.2, 1.5, 3.0]).view(1, 3, 1, 1).expand(n, 3, h, w)


def _cnn_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, 2, 1))
    return lambda x: F.interpolate(net(x), x.shape[-2:], mode='bilinear', align_corners=True)


LABELS = torch.tensor([[1., 1.], [1., 0.]])


@torch.no_grad()
@pytest.mark.parametrize('loss', [er_loss, scale_er_loss])
def test_zero_for_equivariant_models(loss):
    x = torch.rand(2, 3, 50, 60)
    flip = HFlip()
    assert loss(_pixel_model(x), _pixel_model(flip(x)), LABELS, flip).item() == 0.0
    for t in (Rescale(0.3), Rescale(0.5), Rescale(2.0)):
        assert loss(_const_model(x), _const_model(t(x)), LABELS, t).item() < 1e-12   # 0 up to rounding of the resampling
    for t in (Rescale(0.3), Rescale(0.5)):   # downscaling keeps the corners, where the ramp's min and max sit
        assert loss(_ramp_model(x), _ramp_model(t(x)), LABELS, t).item() < 1e-6


@torch.no_grad()
@pytest.mark.parametrize('loss', [er_loss, scale_er_loss])
def test_positive_for_non_equivariant_models(loss):
    x = torch.rand(2, 3, 50, 60)
    cnn = _cnn_model()
    for t in (HFlip(), Rescale(0.3), Rescale(0.7), Rotate(20), Translate(5, 3)):
        assert loss(cnn(x), cnn(t(x)), LABELS, t).item() > 1e-5, t
    # the ramp model is not flip-equivariant (it ignores the image)
    assert loss(_ramp_model(x), _ramp_model(HFlip()(x)), LABELS, HFlip()).item() > 1e-3


def test_labels_mask_absent_classes():
    x = torch.rand(2, 3, 40, 40)
    cnn = _cnn_model()
    with torch.no_grad():
        none = torch.zeros(2, 2)
        assert er_loss(cnn(x), cnn(HFlip()(x)), none, HFlip()).item() == 0.0
        assert scale_er_loss(cnn(x), cnn(HFlip()(x)), none, HFlip()).item() == 0.0
        assert min_pool_loss(torch.rand(2, 3, 8, 8) + 1, none).item() == 0.0


def test_cls_loss_manual_formula():
    g = torch.Generator().manual_seed(1)
    cam, labels = torch.randn(4, 6, 7, 9, generator=g), (torch.rand(4, 5, generator=g) > 0.5).float()
    s = cam.mean((2, 3))[:, 1:]
    manual = -(labels * F.logsigmoid(s) + (1 - labels) * F.logsigmoid(-s)).mean()
    torch.testing.assert_close(cls_loss(cam, labels), manual)


def test_hand_numbers_2x2():
    bg = torch.zeros(1, 1, 2, 2)
    cam_x = torch.cat([bg, torch.tensor([[[[0., 1.], [2., 4.]]]])], 1)
    cam_tx = torch.cat([bg, torch.tensor([[[[0., 0.], [0., 4.]]]])], 1)
    one = torch.tensor([[1.]])
    assert abs(er_loss(cam_x, cam_tx, one, HFlip()).item() - 0.4375) < 1e-4
    assert abs(scale_er_loss(cam_x, cam_tx, one, HFlip()).item() - 0.328125) < 1e-4
    assert abs(min_pool_loss(cam_x, one).item() - 0.0) < 1e-7           # smallest of [0, 1, 2, 4] is 0
    assert abs(min_pool_loss(cam_x + 1, one).item() - 1.0) < 1e-6


def test_top_fraction_and_max_onehot():
    x = torch.tensor([[5., 1., 4., 2., 3.]])
    assert top_fraction_mean(x, 0.4).item() == 4.5                  # k = int(5 * 0.4) = 2 -> (5 + 4) / 2
    m = torch.tensor([[[[0.9]], [[0.2]], [[0.7]], [[0.7]]]])
    assert max_onehot(m).flatten().tolist() == pytest.approx([0.9, 0.0, 0.7, 0.7])   # value kept, ties kept


def test_transform_generalisation_and_errors():
    g = torch.Generator().manual_seed(0)
    cam_x, pcm_x = torch.randn(1, 3, 20, 20, generator=g), torch.rand(1, 3, 20, 20, generator=g)
    for t in (HFlip(), Rotate(30), Translate(3, -2)):
        cam_tx, pcm_tx = t(cam_x), t(pcm_x)
        d = objective('seam', (cam_x, pcm_x), (cam_tx, pcm_tx), LABELS[:1], t)
        assert torch.isfinite(d['total'])
    with pytest.raises(ValueError, match='input size'):
        er_loss(cam_x, torch.randn(1, 3, 5, 5), LABELS[:1])       # Rescale(0.3) of 20 is 6, not 5
    with pytest.raises(ValueError, match=r'\[N, K\+1, H, W\]'):
        er_loss(cam_x, cam_x, torch.ones(1, 5), HFlip())
    with pytest.raises(ValueError, match='one of'):
        objective('SEAM', (cam_x, pcm_x), (cam_x, pcm_x), LABELS[:1], HFlip())


def test_objective_variants():
    out_x, out_tx, labels = _outputs(c=4, H=40, seed=7)
    ss = objective('ssenet', out_x, out_tx, labels)
    torch.testing.assert_close(ss['total'], ss['cls'] + ss['scale_er'])
    torch.testing.assert_close(ss['scale_er'], scale_er_loss(out_x[0], out_tx[0], labels))
    base = objective('baseline', out_x[0], None, labels)            # a bare CAM tensor is accepted
    torch.testing.assert_close(base['total'], cls_loss(out_x[0], labels))
    both = objective('baseline', out_x, out_tx, labels)
    torch.testing.assert_close(both['total'], (cls_loss(out_x[0], labels) + cls_loss(out_tx[0], labels)) / 2)
    assert label_mask(labels).shape == (2, 4, 1, 1)
