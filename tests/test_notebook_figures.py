"""The course reads without running anything: every cell that draws has its figure committed, and the committed
outputs stay small. `python tools/run_notebooks.py` regenerates them."""
import json, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT/'nbs').glob('*.ipynb'))
DRAWS = re.compile(r'(?<![\w.])(plot_\w+|plt\.\w+|Figure)\(')   # a plot_* helper, pyplot, or a Figure built by hand
QUIET = '# no figure:'                                          # a drawing cell that shows nothing says why


def code(src: str) -> str:
    "The source without comments and strings' contents that merely mention a plot (docstrings, messages)."
    src = re.sub(r'#.*', '', src)
    return re.sub(r"(\"\"\"|''')[\s\S]*?\1|\"[^\"\n]*\"|'[^'\n]*'", '""', src)


def figure_cells(nb: dict):
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] != 'code': continue
        src = ''.join(c['source'])
        first = src.lstrip().splitlines()[0] if src.strip() else ''
        if first.startswith(('#| export', '#|export', '#| exporti')) or QUIET in src: continue
        if re.search(r'^\s*def plot_', src, re.M) and not DRAWS.search(re.sub(r'^\s*def .*$', '', code(src), flags=re.M)): continue
        if DRAWS.search(code(src)): yield i, c


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_cell_has_its_figure(path):
    nb = json.loads(path.read_text(encoding='utf-8'))
    missing = [i for i, c in figure_cells(nb) if not any('image/png' in o.get('data', {}) for o in c.get('outputs', []))]
    assert not missing, (f"{path.name}: cells {missing} draw but have no committed figure; run "
                         f"`python tools/run_notebooks.py {path.stem}` (or say '{QUIET} <why>' in the cell)")


def test_outputs_stay_small():
    size = sum(len(json.dumps(c.get('outputs', []), ensure_ascii=False)) for p in NOTEBOOKS
               for c in json.loads(p.read_text(encoding='utf-8'))['cells'] if c['cell_type'] == 'code')
    assert size <= 15 * 2**20, f"committed outputs take {size / 2**20:.1f} MB (at most 15 MB)"


def test_the_detector_finds_drawing_cells():
    nb = {'cells': [{'cell_type': 'code', 'source': s, 'outputs': []} for s in
                    ['fig = plot_cams(img, cams)', 'plt.imshow(x)', '#| export\ndef plot_x(): plt.figure()',
                     "print('plot_cams(...) is slow')", 'x = 1  # plot_cams(a)', 'Figure(figsize=(3, 3))',
                     'save_stills(out)  # no figure: writes PNG files']]}
    assert [i for i, _ in figure_cells(nb)] == [0, 1, 5]
