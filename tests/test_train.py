"Tests of seam_nb.train (and the engine under it: seam_nb.engine, seam_nb.engine_internals) that notebook cells cannot hold:\nexact resume, NaN stop, DDP with 2 processes, the CLI."
import os, sys, csv, json, signal, subprocess, time
from pathlib import Path
import numpy as np
import pytest
import torch

from seam_nb.core import SeamError, torch_save_atomic
from seam_nb import train as T
from seam_nb import engine as E
from seam_nb import engine_internals as EI

torch.set_num_threads(1)
SHARED = Path(__file__).resolve().parents[1].parent/'shared'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
# a tiny, fast run: 16 Shapes images of 64 px, batch 4, the tiny backbone
TINY = dict(n_images=16, image_size=64, crop=48, resize_long=(48, 64), batch_size=4, progress=False, device='cpu')
TINY_CLI = ['--n_images', '16', '--image-size', '64', '--crop', '48', '--resize-long', '48,64', '--batch-size', '4',
            '--no-progress', '--device', 'cpu']


def cli(*args, module=True, timeout=240):
    cmd = [sys.executable, '-m', 'seam_nb.train', *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def rows(path):
    with open(path, newline='') as f: return list(csv.DictReader(f))


def test_poly_lr_by_hand():
    assert E.poly_lr(0.01, 0, 1000) == 0.01
    assert abs(E.poly_lr(0.01, 250, 1000) - 0.01 * 0.75 ** 0.9) < 1e-15
    assert abs(E.poly_lr(0.01, 250, 1000) - 0.0077189) < 1e-7      # 0.75**0.9 = exp(0.9 ln 0.75) = 0.771890...
    assert E.poly_lr(0.02, 1000, 1000) == 0.0


def test_optimizer_momentum_faithful_vs_corrected():
    m = torch.nn.Conv2d(3, 4, 1)
    groups = lambda: [{'params': [m.weight], 'lr': 0.01, 'weight_decay': 5e-4}, {'params': [m.bias], 'lr': 0.02, 'weight_decay': 0}]
    f = E.make_optimizer(groups(), 0.01, 5e-4, 'faithful')
    c = E.make_optimizer(groups(), 0.01, 5e-4, 'corrected')
    assert [g['momentum'] for g in f.param_groups] == [5e-4, 5e-4]
    assert [g['momentum'] for g in c.param_groups] == [0.9, 0.9]
    assert [g['weight_decay'] for g in f.param_groups] == [5e-4, 0]
    # the released PolyOptimizer passes weight decay positionally: it lands in SGD's momentum
    assert torch.optim.SGD(groups(), 0.01, 5e-4).defaults['momentum'] == 5e-4
    assert E.set_poly_lr(f, 500, 1000) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert f.param_groups[1]['lr'] == pytest.approx(0.02 * 0.5 ** 0.9)


def test_model_param_groups_multipliers():
    cfg = T.make_config('shapes_cpu', **TINY)
    model = T.build_model(cfg, 7)
    groups = model.param_groups(0.01, 5e-4)
    assert len(groups) == 4
    assert [g['lr'] for g in groups] == pytest.approx([0.01, 0.02, 0.1, 0.2])


class _Noisy(torch.utils.data.Dataset):
    "Items drawn from all three RNGs, like a random augmentation."
    def __len__(self): return 12
    def __getitem__(self, i):
        import random
        return torch.tensor([i + np.random.rand() + random.random() + torch.rand(()).item()])


def test_seeded_items_do_not_depend_on_workers():
    def epoch_items(workers, skip=0):
        smp = EI.EpochBatchSampler(12, 3, seed=1); smp.set_epoch(2, skip)
        dl = torch.utils.data.DataLoader(EI.SeededDataset(_Noisy(), 1), batch_sampler=smp, num_workers=workers)
        return torch.cat(list(dl))
    alone = epoch_items(0)
    torch.testing.assert_close(alone, epoch_items(2), rtol=0, atol=0)       # worker processes change nothing
    torch.testing.assert_close(alone[6:], epoch_items(2, skip=2), rtol=0, atol=0)


def test_resume_matches_uninterrupted_run(tmp_path):
    base = dict(TINY, steps=6, ckpt_every=3, seed=5)
    T.train(T.make_config('shapes_cpu', out=str(tmp_path/'straight'), **base))
    T.train(T.make_config('shapes_cpu', out=str(tmp_path/'resumed'), stop_at=3, **base))
    ck = torch.load(tmp_path/'resumed'/'last.pt', weights_only=True)
    assert ck['step'] == 3
    # simulate a crash after the checkpoint: a stray row beyond it must disappear on resume
    with open(tmp_path/'resumed'/'losses.csv', 'a') as f: f.write('4,0,0.01' + ',9' * (len(rows(tmp_path/'resumed'/'losses.csv')[0]) - 3) + '\n')
    T.train(T.make_config('shapes_cpu', out=str(tmp_path/'resumed'), resume=True, **base))
    a, b = rows(tmp_path/'straight'/'losses.csv'), rows(tmp_path/'resumed'/'losses.csv')
    assert [r['step'] for r in a] == [str(i) for i in range(1, 7)] == [r['step'] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra: assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-6, abs=1e-7), (k, ra, rb)
    wa = torch.load(tmp_path/'straight'/'last.pt', weights_only=True)['model']
    wb = torch.load(tmp_path/'resumed'/'last.pt', weights_only=True)['model']
    for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_checkpoint_is_weights_only(tmp_path):
    T.train(T.make_config('shapes_cpu', out=str(tmp_path), steps=2, **TINY))
    ck = torch.load(tmp_path/'last.pt', weights_only=True)
    assert {'model', 'optimizer', 'step', 'config', 'rng'} <= set(ck)
    assert ck['step'] == 2 and ck['config']['backbone'] == 'tiny' and isinstance(ck['config'], dict)
    assert set(ck['rng'][0]) >= {'python', 'numpy', 'torch'}
    assert len(rows(tmp_path/'losses.csv')) == 2
    assert not list(tmp_path.glob('.*.tmp'))                        # atomic writes leave no temp files


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = T.objective, [0]
    def poisoned(*a, **k):
        out = real(*a, **k); calls[0] += 1
        if calls[0] == 5: out['total'] = out['total'] * float('nan')
        return out
    monkeypatch.setattr(T, 'objective', poisoned)
    with pytest.raises(SeamError, match='at step 5'):
        T.train(T.make_config('shapes_cpu', out=str(tmp_path), steps=8, ckpt_every=2, **TINY))
    assert torch.load(tmp_path/'last.pt', weights_only=True)['step'] == 4
    assert [r['step'] for r in rows(tmp_path/'losses.csv')] == ['1', '2', '3', '4']


def test_amp_and_channels_last_are_noops_on_cpu(tmp_path):
    T.train(T.make_config('shapes_cpu', out=str(tmp_path/'plain'), steps=2, amp='none', channels_last=False, **TINY))
    T.train(T.make_config('shapes_cpu', out=str(tmp_path/'amp'), steps=2, amp='bf16', channels_last=True, **TINY))
    assert rows(tmp_path/'plain'/'losses.csv') == rows(tmp_path/'amp'/'losses.csv')


def test_baseline_and_ssenet_through_the_same_loop(tmp_path):
    for m in ('baseline', 'ssenet'):
        s = T.train(T.make_config('shapes_cpu', out=str(tmp_path/m), method=m, steps=1, **TINY))
        assert s['step'] == 1 and np.isfinite(s['last']['total'])


def test_ddp_gloo_two_processes(tmp_path):
    out = tmp_path/'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'seam_nb.train',
           '--steps', '3', '--ckpt-every', '2', '--out', str(out), *TINY_CLI]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, 'GLOO_SOCKET_IFNAME': 'lo'}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out/'summary.json').read_text())
    assert summary['world_size'] == 2 and summary['step'] == 3
    sums = summary['weights_checksums']
    assert len(sums) == 2 and sums[0] == sums[1]                    # both replicas hold the same weights
    assert sorted(p.name for p in out.glob('*.pt')) == ['last.pt']  # rank 0 alone writes one checkpoint
    assert [r['step'] for r in rows(out/'losses.csv')] == ['1', '2', '3']
    assert torch.load(out/'last.pt', weights_only=True)['world_size'] == 2



def test_torchrun_two_nodes(tmp_path):
    "`torchrun --nnodes 2` as on two machines: two launchers (node ranks 0 and 1, one process each) meet over TCP on 127.0.0.1."
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    out = tmp_path/'nodes'
    def node(rank):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1', '--node_rank', str(rank),
               '--master_addr', '127.0.0.1', '--master_port', str(port), '-m', 'seam_nb.train',
               '--steps', '2', '--ckpt-every', '2', '--out', str(out), *TINY_CLI]
        # output goes to files, not pipes: a node whose unread pipe fills up would block, and the other node's
        # launcher would then wait for it at torchrun's exit barrier (a deadlock that once hung CI for 300 s)
        log = open(tmp_path/f'node{rank}.log', 'w')
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env={**ENV, 'GLOO_SOCKET_IFNAME': 'lo'},
                                start_new_session=True), log
    nodes = [node(0), node(1)]
    deadline = time.monotonic() + 300
    try:
        codes = [p.wait(timeout=max(1, deadline - time.monotonic())) for p, _ in nodes]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p, log in nodes:
            if p.poll() is None: os.killpg(p.pid, signal.SIGKILL); p.wait()   # the launcher and its worker
            log.close()
    logs = '\n'.join(f"--- node {r}:\n" + (tmp_path/f'node{r}.log').read_text()[-2000:] for r in (0, 1))
    assert codes == [0, 0], f"exit codes {codes} (None: timed out)\n{logs}"
    summary = json.loads((out/'summary.json').read_text())
    assert summary['world_size'] == 2 and summary['step'] == 2
    assert len(set(summary['weights_checksums'])) == 1                # the two "machines" hold the same weights

def test_cli_resumes_and_refuses_other_architecture(tmp_path):
    T.train(T.make_config('shapes_cpu', out=str(tmp_path), steps=2, **TINY))
    with pytest.raises(SeamError, match='resume'):                  # same folder without --resume: refused
        T.train(T.make_config('shapes_cpu', out=str(tmp_path), steps=2, **TINY))
    r = cli('--steps', '3', '--out', str(tmp_path), '--resume', *TINY_CLI)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'step 3/3' in r.stdout and len(rows(tmp_path/'losses.csv')) == 3
    assert torch.load(tmp_path/'last.pt', weights_only=True)['step'] == 3
    # a checkpoint of another architecture: one line, exit status 2
    r = cli('--steps', '4', '--out', str(tmp_path), '--resume', '--backbone', 'resnet50', *TINY_CLI)
    assert r.returncode == 2 and r.stderr.startswith('error:') and 'tiny' in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('args,expect', [
    (['--preset', 'imagenet'], 'unknown preset'),
    (['--dataset', 'voc', '--data-root', '/nonexistent/VOC2012'], 'not found'),
])
def test_cli_bad_inputs(tmp_path, args, expect):
    r = cli(*args, '--out', str(tmp_path/'o'), '--steps', '1', *TINY_CLI)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith('error:') and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_empty_image_list(tmp_path):
    (tmp_path/'imgs').mkdir()
    (tmp_path/'labels.csv').write_text('image,labels\n')
    r = cli('--dataset', 'folder', '--data-root', str(tmp_path/'imgs'), '--csv', str(tmp_path/'labels.csv'), '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and r.stderr.startswith('error:') and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('kw,expect', [
    (dict(method='fancy'), 'unknown method'),
    (dict(optimizer='adam'), 'unknown optimizer'),
    (dict(amp='fp8'), 'unknown amp'),
    (dict(dataset='folder', data_root='/nonexistent', csv='/nonexistent.csv'), 'not found'),
    (dict(weights='LINEAR'), 'does not fit'),
    (dict(backbone='resnet38'), '--weights FILE'),                      # ImageNet backbones need their weights ...
    (dict(preset='voc_ssenet'), '--from-scratch'),                      # ... as the released scripts require
])
def test_main_bad_inputs_in_process(tmp_path, capsys, kw, expect):
    "The same entry point called in-process (cheaper than a subprocess): `error: ...` on one line, exit status 2."
    if kw.get('weights') == 'LINEAR':
        torch_save_atomic(torch.nn.Linear(3, 4).state_dict(), tmp_path/'linear.pth'); kw = dict(weights=str(tmp_path/'linear.pth'))
    with pytest.raises(SystemExit) as e:
        T.main(out=str(tmp_path/'o'), steps=1, n_images=16, image_size=64, crop=48, batch_size=4, no_progress=True, device='cpu', **kw)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error:') and expect in err and len(err.strip().splitlines()) == 1


def test_cli_help():
    r = cli('--help')
    assert r.returncode == 0 and '--preset' in r.stdout and '--resume' in r.stdout


def test_voc_sample_short_run(tmp_path):
    voc = SHARED/'voc_sample'
    if not voc.is_dir(): pytest.skip('shared/voc_sample not present')
    cfg = T.make_config('shapes_cpu', dataset='voc', data_root=str(voc), split='train', out=str(tmp_path), steps=2,
                        **{**TINY, 'crop': 64, 'resize_long': (64, 96)})
    s = T.train(cfg)
    assert s['step'] == 2 and np.isfinite(s['last']['total'])
    assert torch.load(tmp_path/'last.pt', weights_only=True)['model']['fc8.weight'].shape[0] == 21


def test_presets_and_config_checks():
    "`check_config(cfg)` became the method `cfg.check()`; the shapes_cpu preset's siamese rescale is 0.5 (was 0.3)."
    cfg = T.make_config('shapes_cpu')
    assert isinstance(cfg, E.EngineConfig) and cfg.rescale == 0.5 and cfg.check() is cfg
    assert T.make_config('voc_resnet38').rescale == 0.3
    for kw, msg in [(dict(method='fancy'), 'unknown method'), (dict(optimizer='adam'), 'unknown optimizer'),
                    (dict(batch_size=0), 'batch_size'), (dict(steps=-1), 'steps'), (dict(rescale=0.0), 'rescale'),
                    (dict(dataset='imagenet'), 'unknown dataset')]:
        with pytest.raises(SeamError, match=msg): T.make_config('shapes_cpu', **kw).check()
    with pytest.raises(SeamError, match='unknown preset'): T.make_config('imagenet')
    with pytest.raises(SeamError, match=r'unknown \w+ option\(s\) colour'): T.make_config('shapes_cpu', colour=3)
    assert not hasattr(T, 'check_config') and not hasattr(T, 'load_model_state')


def test_checkpoint_records_portable_paths(tmp_path):
    "A path inside the shipped data folder is recorded as 'data/<name>' in config.json and in the checkpoint."
    from seam_nb.core import shipped
    w = shipped('tiny_pretext.pth')
    T.train(T.make_config('shapes_cpu', out=str(tmp_path/'run'), steps=1, weights=str(w), **TINY))
    ck = torch.load(tmp_path/'run'/'last.pt', weights_only=True)
    assert ck['config']['weights'] == 'data/tiny_pretext.pth'
    assert json.loads((tmp_path/'run'/'config.json').read_text())['weights'] == 'data/tiny_pretext.pth'
    assert ck['config']['out'] == str(tmp_path/'run')                 # paths elsewhere are kept as given
