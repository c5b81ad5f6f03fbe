"Tests of the seam_nb_demo command: a quick end-to-end run, its files and keys, a rerun, bad --out folders, shipped files."
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch

from seam_nb import demo as D
from seam_nb.backbone import load_weights
from seam_nb.infer import load_model
from seam_nb.model import SEAMNet

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '2', 'MKL_NUM_THREADS': '2', 'MPLBACKEND': 'Agg'}
ROW_KEYS = {'baseline_cam', 'seam_cam', 'seam_pcm', 'seam_crf', 'seam_rw', 'seam_retrained'}


def run_cli(*args, timeout=170):
    return subprocess.run(['seam_nb_demo', *args], capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    "One `seam_nb_demo --quick` run through the console script, shared by the tests below."
    out = tmp_path_factory.mktemp('demo')/'tmp'
    res = run_cli('--quick', '--out', str(out), '--no-progress')
    return out, res


def test_quick_run_writes_results_and_report(quick_run):
    out, res = quick_run
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((out/'results.json').read_text())
    assert set(results) == ROW_KEYS
    for key, row in results.items():
        assert {'miou_best', 'miou_fixed', 'consistency', 'alpha_best'} <= set(row), key
        assert 0 <= row['miou_fixed'] <= row['miou_best'] <= 100
    assert all(results[k]['consistency'] >= 0 for k in ('baseline_cam', 'seam_cam', 'seam_pcm'))
    assert all(results[k]['consistency'] is None for k in ('seam_crf', 'seam_rw', 'seam_retrained'))
    assert results['seam_retrained']['alpha_best'] is None and 0 <= results['seam_retrained']['pseudo_label_miou'] <= 100
    for d in ('refine/rw_eval', 'refine/rw_train'):                      # one random-walk label per image
        assert len(list((out/d).glob('*.png'))) == (D.QUICK.n_eval if d.endswith('eval') else D.QUICK.n_refine)
    report = (out/'report.md').read_text()
    for fig in ('maps.png', 'threshold_curves.png', 'consistency.png', 'losses.png', 'labels.png'):
        assert (out/'figures'/fig).stat().st_size > 1000 and f'figures/{fig}' in report
    assert 'tuned on GT' in report and 'SEAM PCM' in res.stdout          # the table is printed too
    run = json.loads((out/'run.json').read_text())
    assert run['quick'] and run['seconds']['total'] > 0
    assert not list(out.rglob('*.tmp'))                                  # every write was atomic


def test_quick_run_checkpoints_are_slim_and_loadable(quick_run):
    out, res = quick_run
    assert res.returncode == 0, res.stderr[-2000:]
    for m in ('baseline', 'seam'):
        p = out/'checkpoints'/f'shapes_{m}.pth'
        ck = torch.load(p, weights_only=True)
        assert {'model', 'config', 'step'} <= set(ck) and 'optimizer' not in ck and ck['config']['method'] == m
        assert not load_weights(SEAMNet('tiny', num_classes=7), p).missing
        assert load_model(p).num_classes == 7


def test_rerun_same_out_is_clean(quick_run):
    out, res = quick_run
    assert res.returncode == 0, res.stderr[-2000:]
    stamp = (out/'train'/'seam'/'last.pt').stat().st_mtime_ns
    res2 = D.run_demo(out, quick=True, progress=False, verbose=False)   # in process: the finished runs are reused
    assert (out/'train'/'seam'/'last.pt').stat().st_mtime_ns == stamp
    assert res2.keys() == json.loads((out/'results.json').read_text()).keys()


def test_bad_out_is_one_line_error(tmp_path):
    f = tmp_path/'a_file'; f.write_text('x')
    res = run_cli('--quick', '--out', str(f), timeout=120)
    assert res.returncode == 2 and res.stdout == ''
    assert res.stderr.count('\n') == 1 and res.stderr.startswith('error:') and 'is a file' in res.stderr


@pytest.mark.parametrize('case', ['read_only', 'file_parent', 'foreign'])
def test_bad_out_in_process(tmp_path, capsys, case):
    if case == 'read_only':
        ro = tmp_path/'ro'; ro.mkdir(); os.chmod(ro, 0o555); out, msg = ro/'new', 'read-only'
    elif case == 'file_parent':
        (tmp_path/'f').write_text('x'); out, msg = tmp_path/'f'/'sub', 'is a file'
    else:
        (tmp_path/'mine').mkdir(); (tmp_path/'mine'/'notes.txt').write_text('x'); out, msg = tmp_path/'mine', 'did not write'
    try:
        with pytest.raises(SystemExit) as e: D.main(out=str(out), quick=True)
    finally:
        if case == 'read_only': os.chmod(tmp_path/'ro', 0o755)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error:') and msg in err


def test_missing_weights_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e: D.main(out=str(tmp_path/'o'), quick=True, weights=str(tmp_path/'none.pth'))
    assert e.value.code == 2 and 'none.pth' in capsys.readouterr().err


def test_help():
    res = run_cli('--help', timeout=120)
    assert res.returncode == 0 and '--seeds' in res.stdout and '--quick' in res.stdout


@pytest.mark.parametrize('name', ['tiny_pretext.pth', 'shapes_baseline.pth', 'shapes_seam.pth'])
def test_shipped_files(name):
    p = ROOT/'data'/name
    assert p.is_file() and p.stat().st_size < 5 * 2**20
    ck = torch.load(p, weights_only=True)
    assert isinstance(ck['model'], dict) and isinstance(ck['config'], dict)
    rep = load_weights(SEAMNet('tiny', num_classes=7), p)
    assert sorted(rep.missing) == ([] if name.startswith('shapes_') else ['f8_3.weight', 'f8_4.weight', 'f9.weight', 'fc8.weight'])
    assert name in (ROOT/'data'/'README.md').read_text()


def test_no_refine_and_missing_pretext_fallback(tmp_path, monkeypatch):
    "Without data/tiny_pretext.pth the demo warns and trains from scratch; without refinement the two last rows are absent."
    import dataclasses
    monkeypatch.setenv('SEAM_NB_DATA', str(tmp_path/'empty'))
    with pytest.warns(UserWarning, match='from scratch'):
        D.run_demo(tmp_path/'o', budget=dataclasses.replace(D.QUICK, refine=False), progress=False, verbose=False)
    results = json.loads((tmp_path/'o'/'results.json').read_text())
    assert set(results) == ROW_KEYS - {'seam_rw', 'seam_retrained'}
    assert json.loads((tmp_path/'o'/'run.json').read_text())['weights'] == 'scratch'
    assert not (tmp_path/'o'/'train'/'affinity').exists()


def test_refine_flag():
    assert not D.FULL.refine and D.QUICK.refine                           # the default demo stops after the CRF row
    res = run_cli('--help', timeout=120)
    assert '--refine' in res.stdout
