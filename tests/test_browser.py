"""The widgets in a real browser: JupyterLab on 127.0.0.1 with a token, Debian's headless Chromium driven by the
`playwright` package (never a downloaded browser). Runs all cells of a copy of nbs/19_widgets.ipynb, moves the
explorer's scale slider with the keyboard, and checks that the picture and the score change."""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NB = REPO/'nbs'/'19_widgets.ipynb'                 # the EquivarianceExplorer notebook (was 14_widgets before the restructure)
CHROMIUM = Path('/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']
# JupyterLab user settings for the test: no news or update checks, every cell kept in the DOM
SETTINGS = {'@jupyterlab/apputils-extension/notification.jupyterlab-settings': {'checkForUpdates': False, 'fetchNews': 'false'},
            '@jupyterlab/notebook-extension/tracker.jupyterlab-settings': {'windowingMode': 'none'}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def tail(path, n=3000) -> str:
    try: return Path(path).read_text(errors='replace')[-n:]
    except OSError: return ''


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on 127.0.0.1 serving a copy of the notebook; yields (url, log path); killed afterwards."
    if not CHROMIUM.is_file(): pytest.skip(f'{CHROMIUM} not installed (apt-get install chromium)')
    pytest.importorskip('playwright.sync_api', reason='the playwright package is not installed (pip install playwright)')
    pytest.importorskip('jupyterlab', reason='jupyterlab is not installed')
    pytest.importorskip('ipykernel', reason='ipykernel is not installed')
    work = tmp_path/'work'; work.mkdir()
    shutil.copy(NB, work/NB.name)
    settings = tmp_path/'lab_settings'
    for rel, value in SETTINGS.items():
        (settings/rel).parent.mkdir(parents=True, exist_ok=True)
        (settings/rel).write_text(json.dumps(value))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, 'IN_TEST': '1', 'JUPYTER_RUNTIME_DIR': str(tmp_path/'runtime'),
           'JUPYTER_CONFIG_DIR': str(tmp_path/'config'), 'JUPYTER_DATA_DIR': str(tmp_path/'data'),
           'IPYTHONDIR': str(tmp_path/'ipython'), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'jupyter', 'lab', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
           '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', '--ServerApp.open_browser=False',
           f'--ServerApp.root_dir={work}', '--ServerApp.terminals_enabled=False',
           '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate', '--LabApp.extension_manager=readonly',
           '--LabApp.news_url=None',
           f'--LabApp.user_settings_dir={settings}', f'--LabApp.workspaces_dir={tmp_path/"workspaces"}']
    if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')    # CI containers run as root
    log = tmp_path/'jupyterlab.log'
    with open(log, 'wb') as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f'http://127.0.0.1:{port}'
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None: pytest.fail(f'JupyterLab exited with {proc.returncode}:\n{tail(log)}')
            try:
                with urllib.request.urlopen(f'{base}/api/status?token={token}', timeout=2) as r:
                    if r.status == 200: break
            except OSError: pass
            if time.monotonic() > deadline: pytest.fail(f'JupyterLab did not answer within 60 s:\n{tail(log)}')
            time.sleep(0.5)
        yield f'{base}/lab/tree/{NB.name}?token={token}', log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)          # the server and the kernels it started
            try: proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL); proc.wait(timeout=15)


BUSY_JS = """() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim());
  return {busy: prompts.some(p => p.includes('*')), done: prompts.filter(p => /\\d/.test(p)).length, total: prompts.length};
}"""


def wait_for(fn, timeout, what, interval=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v: return v
        time.sleep(interval)
    raise AssertionError(f'timed out after {timeout} s waiting for {what}')


def test_explorer_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import sync_playwright
    url, log = lab
    t0 = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={'width': 1400, 'height': 1000})
            page.goto(url, wait_until='domcontentloaded', timeout=60_000)
            page.wait_for_selector('.jp-NotebookPanel .jp-Notebook .jp-Cell', timeout=60_000)
            page.locator('.jp-StatusBar-TextItem', has_text='Idle').first.wait_for(timeout=60_000)   # kernel started
            # Run > Run All Cells
            page.locator('.lm-MenuBar-itemLabel', has_text=re.compile(r'^Run$')).first.click()
            page.get_by_text('Run All Cells', exact=True).first.click()
            wait_for(lambda: (lambda s: s['busy'] or s['done'] > 0)(page.evaluate(BUSY_JS)), 30, 'the cells to start running')
            state = {}
            def finished():
                s = page.evaluate(BUSY_JS)
                ok = not s['busy'] and s['done'] > 0
                if ok and state.get('last') == s: return True      # the same quiet state twice in a row
                state['last'] = s
                return False
            wait_for(finished, 150, 'all cells to run', interval=1)
            errors = page.locator('[data-mime-type="application/vnd.jupyter.error"]')
            assert errors.count() == 0, 'a cell failed in JupyterLab:\n' + errors.first.inner_text()[:3000]
            s = page.evaluate(BUSY_JS)
            assert s['done'] == s['total'], f'not every cell ran: {s}'

            explorer = page.locator('.seam-explorer').first
            explorer.scroll_into_view_if_needed()
            img, score = explorer.locator('img.seam-panels'), explorer.locator('.seam-scores')
            wait_for(lambda: (img.get_attribute('src') or '').startswith(('blob:', 'data:')), 30, 'the explorer picture')
            src0, score0, shot0 = img.get_attribute('src'), score.inner_text(), img.screenshot()
            assert re.findall(r'\d\.\d{4}', score0) == ['0.0000', '0.0000'], score0   # scale 1: identity, both networks
            page.screenshot(path=str(tmp_path/'explorer_before.png'))

            handle = explorer.locator('.seam-scale .noUi-handle').first
            handle.focus()
            for _ in range(4): handle.press('ArrowLeft')                  # 1.00 -> 0.80 in steps of 0.05
            wait_for(lambda: img.get_attribute('src') != src0 and score.inner_text() != score0, 60,
                     'the explorer to redraw after the slider moved')
            time.sleep(1)                                                # let the last key's redraw land
            readout = explorer.locator('.seam-scale .widget-readout').first.inner_text()
            assert float(readout) < 1.0, readout
            scores = [float(v) for v in re.findall(r'\d\.\d{4}', score.inner_text())]
            assert len(scores) == 2 and all(v > 0 for v in scores), score.inner_text()
            assert img.screenshot() != shot0                              # what the user sees changed
            page.screenshot(path=str(tmp_path/'explorer.png'), full_page=False)
        finally:
            browser.close()
    assert (tmp_path/'explorer.png').stat().st_size > 0
    print(f'browser test: {time.monotonic() - t0:.0f} s; screenshot {tmp_path/"explorer.png"}')
