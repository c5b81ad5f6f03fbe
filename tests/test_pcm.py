"Checks of seam_nb.pcm and seam_nb.pcm_chunked beyond the notebook: chunked == full == reference for many block sizes, gradients, fidelity."
import pytest
import torch
import torch.nn.functional as F
from seam_nb.pcm import pcm, pcm_input, pcm_reference
from seam_nb.pcm_chunked import auto_chunk_size, ChunkedPCM


def _inputs(n=2, c=5, d=7, h=6, w=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g, dtype=dtype), torch.randn(n, d, h, w, generator=g, dtype=dtype)


def _original_prep(cam):
    "The CAM preparation of the original Net.forward, transcribed with its in-place steps."
    n, c, h, w = cam.size()
    with torch.no_grad():
        cam_d = F.relu(cam.detach())
        cam_d_max = torch.max(cam_d.view(n, c, -1), dim=-1)[0].view(n, c, 1, 1) + 1e-5
        cam_d_norm = F.relu(cam_d - 1e-5) / cam_d_max
        cam_d_norm[:, 0, :, :] = 1 - torch.max(cam_d_norm[:, 1:, :, :], dim=1)[0]
        cam_max = torch.max(cam_d_norm[:, 1:, :, :], dim=1, keepdim=True)[0]
        cam_d_norm[:, 1:, :, :][cam_d_norm[:, 1:, :, :] < cam_max] = 0
    return cam_d_norm


def _original_pcm(cam, f):
    "The original PCM after its f9 projection (feat = f9 output)."
    n, c, h, w = f.size()
    cam = F.interpolate(cam, (h, w), mode='bilinear', align_corners=True).view(n, -1, h * w)
    f = f.view(n, -1, h * w)
    f = f / (torch.norm(f, dim=1, keepdim=True) + 1e-5)
    aff = F.relu(torch.matmul(f.transpose(1, 2), f), inplace=True)
    aff = aff / (torch.sum(aff, dim=1, keepdim=True) + 1e-5)
    return torch.matmul(cam, aff).view(n, -1, h, w)


@pytest.mark.parametrize('chunk', [None, 1, 3, 7, 16, 17, 59, 60, 61, 1000, 'auto'])
def test_chunked_matches_reference(chunk):
    cam, feat = _inputs()
    torch.testing.assert_close(pcm(cam, feat, chunk_size=chunk), pcm_reference(cam, feat), atol=1e-5, rtol=1e-5)


def test_matches_original_formula_with_resize():
    cam, feat = _inputs(h=9, w=11)
    big = torch.randn(2, 5, 17, 21)
    for chunk in (None, 8):
        torch.testing.assert_close(pcm(big, feat, chunk_size=chunk), _original_pcm(big, feat), atol=1e-5, rtol=1e-5)


def test_pcm_input_matches_original():
    cam = torch.randn(3, 6, 8, 9) * 3
    torch.testing.assert_close(pcm_input(cam), _original_prep(cam), atol=0, rtol=0)
    # ties among the fg maxima are all kept, as in the original
    tie = torch.zeros(1, 3, 2, 2); tie[0, 1:] = 2.0
    torch.testing.assert_close(pcm_input(tie), _original_prep(tie), atol=0, rtol=0)


@pytest.mark.parametrize('chunk', [1, 5, 13, 60])
def test_gradients_match_full_path(chunk):
    cam, feat = _inputs(seed=3)
    weights = torch.randn(2, 5, 6, 10, generator=torch.Generator().manual_seed(9))
    grads = []
    for cs in (None, chunk):
        c, f = cam.clone().requires_grad_(), feat.clone().requires_grad_()
        (pcm(c, f, chunk_size=cs) * weights).sum().backward()
        grads.append((c.grad, f.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-4)
    assert grads[0][1].abs().sum() > 0


def test_gradcheck_chunked_double():
    cam, feat = _inputs(n=1, c=3, d=4, h=3, w=5, seed=5, dtype=torch.float64)
    cam.requires_grad_(); feat.requires_grad_()
    assert torch.autograd.gradcheck(lambda c, f: pcm(c, f, chunk_size=4), (cam, feat))


def test_detached_cam_trains_only_features():
    "SEAM's PCM input is detached: only the features receive a gradient, in both paths."
    cam, feat = _inputs(seed=2)
    for cs in (None, 7):
        f = feat.clone().requires_grad_()
        out = pcm(pcm_input(cam), f, chunk_size=cs)
        assert out.requires_grad
        out.sum().backward()
        assert f.grad is not None and torch.isfinite(f.grad).all()


def test_no_grad_and_autograd_grad():
    cam, feat = _inputs()
    with torch.no_grad():
        assert not pcm(cam, feat.requires_grad_(), chunk_size=7).requires_grad
    f = feat.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(pcm(cam, f, chunk_size=7).sum(), [f])   # works with autograd.grad, not only backward
    assert g.shape == f.shape


def test_auto_chunk_size():
    assert auto_chunk_size(1, 100) is None
    assert auto_chunk_size(2, 50_000, budget_bytes=2**28) == 2**28 // (2 * 50_000 * 4 * 6)
    assert auto_chunk_size(1, 10**7, budget_bytes=10) == 1


def test_bad_inputs():
    cam, feat = _inputs()
    for bad in (0, -3, 'big'):
        with pytest.raises(ValueError, match='chunk_size'):
            pcm(cam, feat, chunk_size=bad)
    with pytest.raises(ValueError, match='same N'):
        pcm(cam[:1], feat)
    with pytest.raises(ValueError, match='C>=2'):
        pcm_input(torch.rand(1, 1, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_paths_agree():
    cam, feat = (t.cuda() for t in _inputs(h=30, w=40))
    torch.testing.assert_close(pcm(cam, feat, chunk_size=97), pcm(cam, feat), atol=1e-4, rtol=1e-4)


def test_mixed_dtypes_under_autocast():
    "Under autocast the CAM and the normalised features can have different dtypes; the chunked backward copes."
    g = torch.Generator().manual_seed(0)
    cam = torch.rand(2, 3, 42, generator=g).to(torch.bfloat16).requires_grad_()
    f = torch.randn(2, 5, 42, generator=g).requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = ChunkedPCM.apply(cam, f, 4)
    out.float().sum().backward()
    assert cam.grad.dtype == torch.bfloat16 and f.grad.dtype == torch.float32
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
