"""The shape of the package: one notebook per module, the course order, dependencies that run forward only, and
modules a reader takes in at once."""
import ast, json, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The reading order of the course (`nbs/index.ipynb`). Appendix modules are the foundation every part may use;
# the tail appendices (pretext, measurement helpers, benchmark, GPU check) may use everything and are used by nothing.
FOUNDATION = ['core', 'viz', 'transforms', 'sources', 'weights', 'backbones', 'lite0', 'engine_internals', 'pcm_chunked', 'coco']
PART_I = ['shapes', 'cam', 'equivariance', 'pcm', 'losses', 'model']
PART_II = ['engine', 'train', 'infer', 'evaluate', 'demo']
PART_III = ['crf', 'affinity', 'affinity_train', 'random_walk', 'segment', 'retrain', 'pipeline']
WIDGETS = ['widgets', 'viewer']
TAIL = ['pretext', 'measure', 'bench', 'gpu_check']
ORDER = FOUNDATION + PART_I + PART_II + PART_III + WIDGETS + TAIL

def modules():
    return sorted(p.stem for p in (ROOT/'seam_nb').glob('*.py') if not p.stem.startswith('_'))

def imported_modules(path:Path) -> set:
    "Every `seam_nb` module a file imports, at the top or inside a function."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: found.add(mod.split('.')[0] if mod else None)
            elif mod.startswith('seam_nb.'): found.add(mod.split('.')[1])
            if (node.level == 1 and not mod) or mod == 'seam_nb': found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('seam_nb.')}
    return {m for m in found if m and m in modules()}

def test_every_module_has_a_place_in_the_course():
    assert sorted(ORDER) == modules(), f"place new modules in ORDER: {sorted(set(modules()) ^ set(ORDER))}"

@pytest.mark.parametrize('mod', ORDER)
def test_dependencies_run_forward(mod):
    later = [m for m in imported_modules(ROOT/'seam_nb'/f'{mod}.py') if ORDER.index(m) >= ORDER.index(mod)]
    assert not later, f"seam_nb.{mod} imports {later}, which come at or after it in the course order"

def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path/'x.py'
    f.write_text("from .core import a\ndef g():\n    from seam_nb.pipeline import main\n    import seam_nb.viewer\n")
    assert imported_modules(f) == {'core', 'pipeline', 'viewer'}

def notebook_modules() -> dict:
    "notebook file name -> the module it exports (or None)."
    out = {}
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        cells = json.loads(nb.read_text())['cells']
        m = next((re.search(r'#\| default_exp (\w+)', ''.join(c['source'])) for c in cells if c['cell_type'] == 'code'
                  and '#| default_exp' in ''.join(c['source'])), None)
        out[nb.stem] = m[1] if m else None
    return out

def test_one_notebook_per_module_in_course_order():
    nbs = notebook_modules()
    exported = [m for m in nbs.values() if m]
    assert sorted(exported) == modules(), "every module comes from exactly one notebook"
    numbered = [nbs[n] for n in sorted(nbs) if n[:2].isdigit()]
    appendix = [nbs[n] for n in sorted(nbs, key=lambda n: (len(n.split('_')[0]), n)) if n.startswith('a') and nbs[n]]
    assert numbered == PART_I + PART_II + PART_III + WIDGETS, numbered
    # foundation appendices come in dependency order, then the tail; a foundation appendix added later (a15_coco)
    # may be numbered after the tail, since nothing in the tail depends on it being read first
    assert [m for m in appendix if m in FOUNDATION] == FOUNDATION and [m for m in appendix if m in TAIL] == TAIL, appendix
    assert sorted(appendix) == sorted(FOUNDATION + TAIL), appendix

@pytest.mark.parametrize('mod', ORDER)
def test_modules_stay_small(mod):
    n = len((ROOT/'seam_nb'/f'{mod}.py').read_text().splitlines())
    assert n <= 400, f"seam_nb/{mod}.py has {n} lines: split it along its ideas"

def test_no_lines_joined_to_save_space():
    "Statements chained with ';' stay rare: the 400-line limit must not be met by cramming."
    for p in (ROOT/'seam_nb').glob('*.py'):
        if p.stem.startswith('_'): continue
        src = p.read_text()
        tree = ast.parse(src)
        counts = {}
        for n in ast.walk(tree):
            if isinstance(n, ast.stmt) and not isinstance(n, (ast.FunctionDef, ast.ClassDef)): counts[n.lineno] = counts.get(n.lineno, 0) + 1
        crowded = [l for l, c in counts.items() if c >= 4]
        assert len(crowded) <= 3, f"{p.name}: lines {crowded[:5]} hold 4+ statements each"
