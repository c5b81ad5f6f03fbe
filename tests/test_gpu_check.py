"The GPU check's CPU rehearsal (tools/gpu_check.sh --dry): every step of the script at tiny sizes, as CI can run it."
import json, os, subprocess, sys
from pathlib import Path
import pytest
from seam_nb.gpu_check import main, format_gpu_check

ROOT = Path(__file__).resolve().parents[1]

def test_dry_run_writes_every_section(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(['bash', str(ROOT/'tools'/'gpu_check.sh'), '--dry', str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path/'gpu-dry.json').read_text())
    assert res['errors'] == {} and res['meta']['dry'] is True
    assert [t['amp'] for t in res['train']] == ['none', 'bf16'] and all(t['images_per_s'] > 0 for t in res['train'])
    assert res['torchrun']['backend'] == 'gloo' and res['torchrun']['world_size'] == 1
    assert [i['pcm_chunk'] for i in res['infer']] == [None, 512]
    assert {'seam_nb_infer', 'seam_nb_demo --quick', 'explorer (shapes)'} <= set(res['paths'])
    md = (tmp_path/'gpu-dry.md').read_text()
    assert 'CPU rehearsal' in md and 'torchrun' in md and 'FAILED' not in md

def test_refuses_cpu_without_dry(tmp_path, capsys):
    with pytest.raises(SystemExit) as e: main(argv=['--device', 'cpu', '--out', str(tmp_path/'g.json')])
    assert e.value.code != 0 and 'needs a CUDA device' in capsys.readouterr().err
    assert not (tmp_path/'g.json').exists()

def test_bad_out_and_failed_steps_are_reported(tmp_path, capsys):
    with pytest.raises(SystemExit): main(argv=['--dry', '--out', str(tmp_path/'g.txt')])
    assert 'must name a .json' in capsys.readouterr().err
    res = dict(meta=dict(gpu=None, torch='x', cuda=None, python='3', time='t', seconds=1.0, dry=True), errors={'torchrun': 'SeamError: boom'})
    md = format_gpu_check(res)
    assert '**FAILED: torchrun**' in md and 'boom' in md
