"""Tests of seam_nb.demo (Part II: run_demo, 3 rows), seam_nb.pipeline (seam_nb_demo: Part III rows added through run_demo's
`extend` hook) and seam_nb.pretext: a quick end-to-end run, its files and keys, a rerun, bad --out folders, shipped files."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch

from seam_nb import demo as D
from seam_nb import pipeline as P
from seam_nb.core import SeamError, shipped, data_dir, REBUILD
from seam_nb.weights import load_weights, load_network
from seam_nb.model import SEAMNet

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '2', 'MKL_NUM_THREADS': '2', 'MPLBACKEND': 'Agg'}
PART2_KEYS = ['baseline_cam', 'seam_cam', 'seam_pcm']                 # run_demo without `extend`
ROW_KEYS = {*PART2_KEYS, 'seam_crf', 'seam_rw', 'seam_retrained'}     # seam_nb_demo --quick (pipeline.part3)


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
        assert load_network(p, SEAMNet).num_classes == 7


def test_rerun_same_out_is_clean(quick_run):
    out, res = quick_run
    assert res.returncode == 0, res.stderr[-2000:]
    stamps = {p: p.stat().st_mtime_ns for p in (out/'train').rglob('last.pt')}
    assert len(stamps) == 4                                              # baseline, seam, affinity, segment
    res2 = D.run_demo(out, quick=True, progress=False, verbose=False, extend=P.part3)   # in process: finished runs are reused
    assert stamps == {p: p.stat().st_mtime_ns for p in (out/'train').rglob('last.pt')}
    assert res2.keys() == json.loads((out/'results.json').read_text()).keys() == ROW_KEYS
    # without the extend hook run_demo is Part II alone: the three DEMO_ROWS
    res3 = D.run_demo(out, quick=True, progress=False, verbose=False)
    assert list(res3) == PART2_KEYS == [r.key for r in D.DEMO_ROWS]
    assert list(json.loads((out/'results.json').read_text())) == PART2_KEYS
    assert stamps == {p: p.stat().st_mtime_ns for p in (out/'train').rglob('last.pt')}


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
        with pytest.raises(SystemExit) as e: P.main(out=str(out), quick=True)
    finally:
        if case == 'read_only': os.chmod(tmp_path/'ro', 0o755)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error:') and msg in err


def test_missing_weights_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e: P.main(out=str(tmp_path/'o'), quick=True, weights=str(tmp_path/'none.pth'))
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
    assert shipped(name) == data_dir()/name == p and name in REBUILD      # data_dir, shipped, REBUILD: seam_nb.core


def test_shipped_affinity_network():
    "data/shapes_affinity.pth (shipped since the restructure): an AffinityNet checkpoint, small, rebuildable."
    from seam_nb.affinity import AffinityNet
    p = shipped('shapes_affinity.pth')
    assert p.stat().st_size < 5 * 2**20 and 'shapes_affinity.pth' in REBUILD
    ck = torch.load(p, weights_only=True)
    assert isinstance(ck['model'], dict) and isinstance(ck['config'], dict) and 'optimizer' not in ck
    assert isinstance(load_network(p, AffinityNet), AffinityNet)
    with pytest.raises(SeamError, match='not a trained SEAMNet'): load_network(p, SEAMNet)


def test_data_readme_is_current():
    text = (ROOT/'data'/'README.md').read_text()
    assert all(p.name in text for p in (ROOT/'data').glob('*.pth'))
    assert all(f'photos/{p.name}' in text or p.name in text for p in (ROOT/'data'/'photos').glob('*.jpg'))
    for gone in ('seam_nb_demo --pretext', 'seam_nb.backbone', 'infer.load_model', 'seam_nb.demo.train_pretext'):
        assert gone not in text, gone


def test_missing_shipped_file_names_its_rebuild_command(tmp_path, monkeypatch):
    monkeypatch.setenv('SEAM_NB_DATA', str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(SeamError, match='seam_nb_pretext --out data'): shipped('tiny_pretext.pth')
    with pytest.raises(SeamError, match='not found'): shipped('other.pth')


def test_no_refine_and_missing_pretext_fallback(tmp_path, monkeypatch):
    "Without data/tiny_pretext.pth the demo warns and trains from scratch; without refinement the two last rows are absent."
    import dataclasses
    monkeypatch.setenv('SEAM_NB_DATA', str(tmp_path/'empty'))
    with pytest.warns(UserWarning, match='from scratch'):
        D.run_demo(tmp_path/'o', budget=dataclasses.replace(D.QUICK, refine=False), progress=False, verbose=False,
                   extend=P.part3)
    results = json.loads((tmp_path/'o'/'results.json').read_text())
    assert set(results) == ROW_KEYS - {'seam_rw', 'seam_retrained'}
    assert json.loads((tmp_path/'o'/'run.json').read_text())['weights'] == 'scratch'
    assert not (tmp_path/'o'/'train'/'affinity').exists()


def test_refine_flag():
    assert not D.FULL.refine and D.QUICK.refine                           # the default demo stops after the CRF row
    res = run_cli('--help', timeout=120)
    assert '--refine' in res.stdout and '--pretext' not in res.stdout     # pretraining is seam_nb_pretext now
    assert '--pretext' not in P.main.parser()._option_string_actions


def test_check_out_dir(tmp_path):
    "Moved from the notebook: files, foreign folders and read-only parents are refused; the demo's own folder is reusable."
    d = tmp_path
    (d/'file').write_text('x'); (d/'other').mkdir(); (d/'other'/'mine.txt').write_text('x')
    with pytest.raises(SeamError, match='is a file'): D.check_out_dir(d/'file')
    with pytest.raises(SeamError, match='is a file'): D.check_out_dir(d/'file'/'sub')
    with pytest.raises(SeamError, match='did not write'): D.check_out_dir(d/'other')
    (d/'ro').mkdir(); os.chmod(d/'ro', 0o555)
    try:
        with pytest.raises(SeamError, match='read-only'): D.check_out_dir(d/'ro'/'new')
    finally: os.chmod(d/'ro', 0o755)
    assert D.check_out_dir(d/'a'/'b') == d/'a'/'b' and D.check_out_dir(d/'a'/'b') == d/'a'/'b'   # reusable
    assert (d/'a'/'b'/D.MARKER).is_file()


def test_seed_summary_and_tables():
    "summarize_seeds / format_seed_tables (was demo.format_bench) on made-up per-seed results."
    row = lambda b: {'miou_best': b, 'miou_fixed': b - 1, 'consistency': 0.1, 'alpha_best': 0.3, 'alpha_fixed': 0.26}
    per_seed = {0: {'baseline_cam': row(40), 'seam_cam': row(46), 'seam_pcm': row(47)},
                1: {'baseline_cam': row(42), 'seam_cam': row(45), 'seam_pcm': row(44)}}
    s = P.summarize_seeds(per_seed)
    assert s['mean']['seam_cam']['miou_best'] == pytest.approx(45.5) and s['std']['baseline_cam']['miou_best'] == pytest.approx(1.0)
    c = s['claims']['miou_best']
    assert c['seam_cam_minus_baseline_cam'] == pytest.approx(4.5) and c['gain_at_least_5_points'] is False
    assert c['ordering_per_seed'] == {'0': True, '1': False} and c['ordering_baseline_lt_seam_cam_le_seam_pcm'] is True
    text = P.format_seed_tables(per_seed, s)
    assert '### seed 0' in text and '### seed 1' in text and 'mean over seeds 0, 1' in text and '+4.5 points' in text


def test_pretext_weights(tmp_path):
    "seam_nb_pretext (was `seam_nb_demo --pretext`): a backbone-only file that SEAMNet loads with its heads at init."
    from seam_nb.pretext import train_pretext, PRETEXT_SEED
    p = train_pretext(tmp_path, steps=2, n_images=4, batch_size=2, n_val=2, progress=False)
    assert p == tmp_path/'tiny_pretext.pth' and not (tmp_path/'.pretext_run.pt').exists()
    ck = torch.load(p, weights_only=True)
    assert ck['step'] == 2 and ck['pretext']['first_seed'] == PRETEXT_SEED and ck['pretext']['command'].startswith('seam_nb_pretext --out')
    rep = load_weights(SEAMNet('tiny', num_classes=7), p)
    assert sorted(rep.missing) == ['f8_3.weight', 'f8_4.weight', 'f9.weight', 'fc8.weight']
