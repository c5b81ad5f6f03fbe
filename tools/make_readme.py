"""Generate README.md from nbs/index.ipynb (quarto, which nbdev_readme needs, is not available offline).

Markdown cells are copied as they are; code cells are shown as ```python blocks unless they carry an nbdev
directive that hides them (`#| hide`, `#| export`, ...). Outputs are not copied; a line `<!-- include path -->`
becomes the text of that file (the notebooks' run-time table, `nbs/run_times.md`).

    python tools/make_readme.py          # write README.md
    python tools/make_readme.py --check  # exit 1 if README.md is out of date
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDING = ('#| hide', '#| export', '#| exporti', '#| exports', '#| default_exp', '#| eval: false')
HEADER = '<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n'

INCLUDE = re.compile(r'^<!-- include (\S+) -->$', re.M)

def include(src: str) -> str:
    "Replace each `<!-- include path -->` line by that file's text (e.g. the notebooks' run-time table)."
    return INCLUDE.sub(lambda m: (ROOT/m[1]).read_text(encoding='utf-8').strip('\n') if (ROOT/m[1]).exists() else m[0], src)

def render(nb_path=ROOT/'nbs'/'index.ipynb') -> str:
    nb = json.loads(Path(nb_path).read_text(encoding='utf-8'))
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source']).strip('\n')
        if not src: continue
        if cell['cell_type'] == 'markdown': parts.append(include(src))
        elif cell['cell_type'] == 'code':
            if any(line.strip().startswith(HIDING) for line in src.splitlines()): continue
            parts.append('```python\n' + src + '\n```')
    return HEADER + '\n\n'.join(parts) + '\n'

def main(argv):
    text, out = render(), ROOT/'README.md'
    if '--check' in argv:
        if not out.exists() or out.read_text(encoding='utf-8') != text:
            print('README.md is out of date: run `python tools/make_readme.py`', file=sys.stderr); return 1
        return 0
    out.write_text(text, encoding='utf-8'); return 0

if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
