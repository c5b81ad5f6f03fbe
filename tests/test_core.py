"""Plumbing tests of seam_nb.core (moved out of the notebooks, plus the helpers other modules now share): Ctrl-C during
an atomic checkpoint write, the console entry point, option parsing, list and folder checks, portable paths; and the
small public helpers that were renamed or moved in the restructure (cam, equivariance, transforms, pcm_chunked)."""
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from seam_nb import core
from seam_nb.core import (SeamError, sigint_deferred, torch_save_atomic, dashed_to_underscored, parse_numbers,
                          check_dir, check_files, portable_path, portable_config, data_dir, torch_threads)
from seam_nb.shapes import box_blur
from seam_nb.sources import read_id_list


# ---------------------------------------------------------------- Ctrl-C during a checkpoint write
def test_sigint_during_atomic_save_is_deferred():
    "Moved from a01_core: a Ctrl-C that arrives mid-write lets the write complete, then interrupts after the block."
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)   # Python's own Ctrl-C, whatever pytest or a shell installed
    try:
        with tempfile.TemporaryDirectory() as d:
            with pytest.raises(KeyboardInterrupt):                      # ... and the interruption comes after the block
                with sigint_deferred():
                    signal.raise_signal(signal.SIGINT)                  # arrives mid-block ...
                    torch_save_atomic({'x': torch.ones(3)}, Path(d)/'ck.pt')   # ... yet the write completes
                raise AssertionError('no KeyboardInterrupt')            # (not reached: the block's exit raises first)
            assert torch.load(Path(d)/'ck.pt', weights_only=True)['x'].sum().item() == 3.
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handler is restored
            assert not [p for p in Path(d).iterdir() if p.name != 'ck.pt']       # no temp file left
    finally:
        signal.signal(signal.SIGINT, outer)


def test_sigint_deferred_leaves_other_handlers_alone():
    "With a custom (or ignored) SIGINT handler installed, sigint_deferred changes nothing."
    seen = []
    outer = signal.signal(signal.SIGINT, lambda s, f: seen.append(s))
    try:
        with sigint_deferred():
            signal.raise_signal(signal.SIGINT)
        assert seen == [signal.SIGINT]                                  # delivered at once, to the custom handler
    finally:
        signal.signal(signal.SIGINT, outer)


# ---------------------------------------------------------------- the console entry point and option parsing
def test_dashed_to_underscored():
    assert dashed_to_underscored(['--data-root', 'a-b', '--n-images=3', '-x', '--', 'p-q']) == \
        ['--data_root', 'a-b', '--n_images=3', '-x', '--', 'p-q']


def test_console_accepts_both_option_spellings(capsys):
    @core.console
    def main(data_root:str=None, # a folder
             n_images:int=2, # count
             fail:bool=False): # raise a SeamError
        "A test command."
        if fail: raise SeamError('it went wrong')
        print(data_root, n_images)
    main(argv=['--data-root', 'x', '--n-images', '5']); main(argv=['--data_root', 'y', '--n_images=6'])
    main(data_root='z')                                                 # from Python with arguments
    assert capsys.readouterr().out.split('\n')[:3] == ['x 5', 'y 6', 'z 2']
    assert {'--data_root', '--n_images', '--fail'} <= set(main.parser()._option_string_actions)
    with pytest.raises(SystemExit) as e: main(fail=True)
    assert e.value.code == 2 and capsys.readouterr().err == 'error: it went wrong\n'
    with pytest.raises(SystemExit) as e: main(argv=['--fail'])
    assert e.value.code == 2 and capsys.readouterr().err == 'error: it went wrong\n'


def test_parse_numbers():
    assert parse_numbers('0.5,1, 1.5') == (0.5, 1.0, 1.5) and parse_numbers('448 768', '--resize_long', 2, int) == (448, 768)
    for text, msg in [('a,b', 'wants numbers'), ('', 'one or more'), ('0,1', 'positive'), ('1.5,2', 'wants integers')]:
        with pytest.raises(SeamError, match=msg): parse_numbers(text, '--scales', kind=int if '.' in text else float)
    with pytest.raises(SeamError, match='--alphas wants 2 values'): parse_numbers('4', '--alphas', n=2)


# ---------------------------------------------------------------- lists, folders, paths
def test_read_id_list(tmp_path):
    (tmp_path/'l.txt').write_text('b\n\na\nb\n/JPEGImages/c.jpg /SegmentationClassAug/c.png\n')
    assert read_id_list(tmp_path/'l.txt') == ['b', 'a', 'c']            # duplicates dropped, file order kept
    (tmp_path/'e.txt').write_text('\n \n')
    with pytest.raises(SeamError, match='empty'): read_id_list(tmp_path/'e.txt')
    with pytest.raises(SeamError, match='not found'): read_id_list(tmp_path/'none.txt')


def test_check_dir_and_files(tmp_path):
    with pytest.raises(SeamError, match=r'^CAM folder .*nope does not exist$'): check_dir(tmp_path/'nope', 'CAM')
    with pytest.raises(SeamError, match='no CAM folder given'): check_dir(None, 'CAM')
    for n in ('a', 'b'): (tmp_path/f'{n}.npz').write_bytes(b'')
    check_files(tmp_path, ['a', 'b'], '.npz', 'CAM')
    with pytest.raises(SeamError, match=rf'^2 of 4 CAM files are missing from {tmp_path} \(first: c\.npz, d\.npz\)$'):
        check_files(tmp_path, ['a', 'b', 'c', 'd'], '.npz', 'CAM')
    with pytest.raises(SeamError, match='ground-truth folder .* does not exist'): check_files(tmp_path/'x', ['a'], '.png', 'ground-truth')
    with pytest.raises(SeamError, match='empty'): check_files(tmp_path, [], '.npz', 'CAM')


def test_portable_paths(tmp_path):
    inside = data_dir()/'tiny_pretext.pth'
    assert portable_path(str(inside)) == 'data/tiny_pretext.pth'
    assert portable_path(str(tmp_path/'run'/'last.pt'), root=tmp_path) == 'run/last.pt'
    assert portable_path(str(tmp_path/'x')) == str(tmp_path/'x') and portable_path('rel/x') == 'rel/x' and portable_path(None) is None
    cfg = portable_config({'weights': str(inside), 'out': str(tmp_path/'o'), 'lr': 0.1, 'method': str(inside)}, root=tmp_path)
    assert cfg == {'weights': 'data/tiny_pretext.pth', 'out': 'o', 'lr': 0.1, 'method': str(inside)}   # path fields only


def test_torch_threads_and_box_blur():
    n = torch.get_num_threads()
    with torch_threads(1): assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
    a = np.zeros((9, 9)); a[4, 4] = 81.
    b = box_blur(a, 1, times=1)
    assert b.shape == a.shape and b.sum() == pytest.approx(81.) and b[3:6, 3:6] == pytest.approx(np.full((3, 3), 9.))
    assert np.array_equal(box_blur(a, 0), a)


# ---------------------------------------------------------------- renamed and moved helpers
def test_cam_helpers():
    from seam_nb.cam import bg_power, max_and_class, cam_dict_to_label, power_threshold
    assert np.array_equal(bg_power(np.zeros((0, 3, 4)), 4), np.ones((1, 3, 4)))          # no class at all: background 1
    assert torch.equal(bg_power(torch.zeros(2, 0, 3, 4), 4), torch.ones(2, 1, 3, 4))
    assert bg_power(np.full((2, 1, 1), 0.5), 2)[0, 0, 0] == pytest.approx(0.25)
    cams = {3: np.array([[0.9, 0.1]], np.float32), 5: np.array([[0.2, 0.3]], np.float32)}
    m, c = max_and_class(cams, (1, 2))
    assert m[0].tolist() == pytest.approx([0.9, 0.3]) and c.tolist() == [[3, 5]]
    assert max_and_class({}, (2, 2))[1].tolist() == [[0, 0], [0, 0]]
    assert cam_dict_to_label(cams, (1, 2)).tolist() == [[3, 5]]
    assert cam_dict_to_label(cams, (1, 2), alpha=0.5).tolist() == [[3, 0]]
    t = float(power_threshold(4))
    assert t == pytest.approx((1 - t) ** 4, abs=1e-9)
    assert cam_dict_to_label(cams, (1, 2), 'power', 4).tolist() == cam_dict_to_label(cams, (1, 2), 'threshold', t).tolist()
    with pytest.raises(SeamError, match='unknown background'): cam_dict_to_label(cams, (1, 2), 'fancy')


def test_first_output_resize_image_and_pcm_block():
    from seam_nb.equivariance import first_output
    from seam_nb.transforms import resize_image
    from seam_nb.pcm_chunked import pcm_block
    from seam_nb.pcm import pcm_reference
    x = torch.zeros(1)
    assert first_output((x, None)) is x and first_output([x]) is x and first_output(x) is x
    img = np.arange(24, dtype=np.uint8).reshape(4, 6)
    assert resize_image(img, (6, 4), 0) is img and resize_image(img, (3, 2), 0).shape == (2, 3)
    with pytest.raises(TypeError, match='uint8'): resize_image(img.astype(np.float32), (3, 2), 0)
    g = torch.Generator().manual_seed(0)
    cam, f = torch.rand(1, 3, 4, 5, generator=g), torch.randn(1, 6, 4, 5, generator=g)
    fn = f.flatten(2) / (f.flatten(2).norm(dim=1, keepdim=True) + 1e-5)
    torch.testing.assert_close(pcm_block(cam.flatten(2), fn, fn).view(1, 3, 4, 5), pcm_reference(cam, f), atol=1e-5, rtol=1e-5)
