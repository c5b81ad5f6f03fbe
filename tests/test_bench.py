"Tests of the seam_nb_bench command: JSON keys and positive ratios (never timings), bad options."
import os, sys, json, subprocess
from pathlib import Path
import pytest

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1', 'MPLBACKEND': 'Agg'}


def bench(*args, timeout=300):
    return subprocess.run([sys.executable, '-m', 'seam_nb.bench', *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def test_quick_tiny_writes_json(tmp_path):
    out = tmp_path/'tmp'/'bench.json'
    r = bench('--quick', '--models', 'tiny', '--device', 'cpu', '--threads', '1', '--out', str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res) >= {'meta', 'models', 'ratios', 'pcm', 'eval', 'random_walk'}
    assert res['meta']['quick'] is True and res['meta']['device'] == 'cpu'
    tiny = res['models']['tiny']
    assert set(tiny) == {'train', 'infer', 'fits_24gb'}
    assert {'step_s', 'images_per_s', 'crop', 'batch'} <= set(tiny['train'])
    assert {'batched_s', 'per_view_s', 'ratio'} <= set(tiny['infer'])
    assert tiny['fits_24gb']['method'].startswith('computed') and isinstance(tiny['fits_24gb']['fits'], bool)
    for k in ('1x', '2x'):
        assert {'full_s', 'chunked_s', 'full_bytes', 'chunked_bytes', 'memory_ratio', 'time_ratio'} <= set(res['pcm'][k])
    assert res['pcm']['2x']['positions'] == 4 * res['pcm']['1x']['positions'] or res['pcm']['2x']['positions'] > res['pcm']['1x']['positions']
    assert len(res['pcm']['curve']) >= 2
    assert 'extrapolated' in res['eval']['note'] and res['eval']['sweep_per_1000_s'] > 0
    expected = {'infer_per_view_over_batched_tiny', 'pcm_memory_full_over_chunked_1x', 'pcm_memory_full_over_chunked_2x',
                'pcm_time_chunked_over_full_1x', 'pcm_time_chunked_over_full_2x', 'eval_count_loop_over_bincount',
                'eval_sweep_loop_over_onepass'}
    assert expected <= set(res['ratios'])
    assert all(v > 0 for v in res['ratios'].values()), res['ratios']
    assert out.with_suffix('.png').stat().st_size > 0
    assert not list(out.parent.glob('*.tmp')) and not list(out.parent.glob('.*.tmp'))
    assert 'ratio ' in r.stdout and 'PCM 2x VOC' in r.stdout


@pytest.mark.parametrize('args, expect', [
    (['--models', 'vgg'], 'unknown model'),
    (['--crop', '0'], '--crop must be a positive integer'),
    (['--out', 'x.txt'], '.json'),
])
def test_bad_options_one_line(tmp_path, args, expect):
    r = bench('--quick', '--out', str(tmp_path/'b.json'), *args) if '--out' not in args else bench('--quick', *args)
    assert r.returncode != 0
    assert expect in r.stderr and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_help():
    r = bench('--help')
    assert r.returncode == 0 and '--quick' in r.stdout and '--models' in r.stdout
