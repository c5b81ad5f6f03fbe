"""Execute every notebook top to bottom as a reader would, keep its outputs, and time it.

The committed notebooks carry the outputs a reader needs (figures, tables), so that the course reads on GitHub
without running anything. This script regenerates them: each notebook runs in a fresh kernel from `nbs/` (not in
test mode), its outputs are written back, `nbdev_clean` tidies the metadata, and the run times go to
`nbs/run_times.md` (the table the README shows) and into the README's table through `tools/make_readme.py`.

    python tools/run_notebooks.py                 # every notebook
    python tools/run_notebooks.py 02_cam 04_pcm   # some (the others keep their outputs and times)
    python tools/run_notebooks.py --check         # only the limits below, on the committed notebooks

Limits (a reader's laptop): any one notebook at most 3 minutes, all of them at most 25, and the outputs at most
15 MB in all. Anything longer loads a shipped result and prints the command that recomputes it.
"""
import json, os, re, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
TIMES = NBS/'run_times.md'
MAX_ONE_S, MAX_ALL_S, MAX_OUTPUT_BYTES = 180, 25 * 60, 15 * 2**20


def notebooks():
    return sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith('_'))


def output_bytes(path: Path) -> int:
    "Size of a notebook's outputs as stored (JSON)."
    nb = json.loads(path.read_text(encoding='utf-8'))
    return sum(len(json.dumps(c.get('outputs', []), ensure_ascii=False)) for c in nb['cells'] if c['cell_type'] == 'code')


MAX_WIDTH = 1200   # px: wider figures are scaled down before they are stored


def shrink_png(b64: str) -> str:
    "A figure as stored: at most MAX_WIDTH px wide, 256 colours, optimised (a plot loses nothing visible; 3-10x smaller)."
    import base64, io
    from PIL import Image
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    if im.mode in ('RGBA', 'LA', 'P'):
        im = im.convert('RGBA'); bg = Image.new('RGB', im.size, 'white'); bg.paste(im, mask=im.split()[-1]); im = bg
    im = im.convert('RGB')
    if im.width > MAX_WIDTH: im = im.resize((MAX_WIDTH, round(im.height * MAX_WIDTH / im.width)), Image.LANCZOS)
    out = io.BytesIO(); im.quantize(256).save(out, 'PNG', optimize=True)
    small = base64.b64encode(out.getvalue()).decode()
    return small if len(small) < len(b64) else b64


def shrink_outputs(path: Path):
    "Shrink every PNG output of a notebook in place."
    nb = json.loads(path.read_text(encoding='utf-8'))
    for c in nb['cells']:
        for o in c.get('outputs', []):
            png = o.get('data', {}).get('image/png')
            if png: o['data']['image/png'] = shrink_png(png if isinstance(png, str) else ''.join(png))
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')


RUN_LINE = re.compile(r'^\*Run time on a 2-core laptop:.*$', re.M)


def stamp_run_time(path: Path, seconds: float):
    "Write the measured time into the notebook's opening 'What you will learn here' cell (replacing an older stamp)."
    nb = json.loads(path.read_text(encoding='utf-8'))
    cell = next((c for c in nb['cells'] if c['cell_type'] == 'markdown' and ''.join(c['source']).startswith('**What you will learn')), None)
    if cell is None: return
    line = f"*Run time on a 2-core laptop: {seconds:.0f} s from top to bottom (measured by `tools/run_notebooks.py`).*"
    src = ''.join(cell['source'])
    src = RUN_LINE.sub(line, src) if RUN_LINE.search(src) else src.rstrip('\n') + '\n\n' + line
    cell['source'] = src.splitlines(keepends=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')


def run_one(path: Path) -> float:
    "Execute one notebook in place (outputs kept); returns seconds; raises on a failing cell."
    from execnb.shell import CaptureShell
    env = os.environ.pop('IN_TEST', None)                       # a reader's run, not the test mode
    cwd = os.getcwd()
    os.chdir(NBS)
    try:
        t0 = time.perf_counter()
        CaptureShell().execute(path, path, exc_stop=True)
        return time.perf_counter() - t0
    finally:
        os.chdir(cwd)
        if env is not None: os.environ['IN_TEST'] = env


def read_times() -> dict:
    if not TIMES.exists(): return {}
    rows = re.findall(r'^\| `(\w+)` \| ([\d.]+) \|', TIMES.read_text(), re.M)
    return {n: float(s) for n, s in rows}


def write_times(times: dict):
    total = sum(times.values())
    lines = ['| notebook | run time (s) | outputs (kB) |', '|---|---:|---:|']
    for name in sorted(times):
        lines.append(f"| `{name}` | {times[name]:.0f} | {output_bytes(NBS/f'{name}.ipynb') / 1024:.0f} |")
    size = sum(output_bytes(p) for p in notebooks())
    lines += [f"| **all {len(times)}** | **{total:.0f}** ({total / 60:.1f} min) | **{size / 1024:.0f}** |", '',
              f"Measured by `python tools/run_notebooks.py` on {machine()}, {time.strftime('%Y-%m-%d')}."]
    TIMES.write_text('\n'.join(lines) + '\n')


def machine() -> str:
    cpu = next((l.split(':', 1)[1].strip() for l in Path('/proc/cpuinfo').read_text().splitlines() if l.startswith('model name')), 'a CPU') \
        if Path('/proc/cpuinfo').exists() else 'a CPU'
    return f"{os.cpu_count()} cores ({cpu})"


def check(times: dict) -> list:
    "Every limit that is broken, as a message."
    bad = [f"{n} takes {s:.0f} s (limit {MAX_ONE_S} s)" for n, s in times.items() if s > MAX_ONE_S]
    if sum(times.values()) > MAX_ALL_S: bad.append(f"all notebooks take {sum(times.values()):.0f} s (limit {MAX_ALL_S} s)")
    size = sum(output_bytes(p) for p in notebooks())
    if size > MAX_OUTPUT_BYTES: bad.append(f"outputs take {size / 2**20:.1f} MB (limit {MAX_OUTPUT_BYTES / 2**20:.0f} MB)")
    return bad


def main(argv):
    if '--check' in argv:
        bad = check(read_times())
        print('\n'.join(bad) or 'within the limits'); return 1 if bad else 0
    wanted = [a for a in argv if not a.startswith('-')]
    paths = [p for p in notebooks() if not wanted or p.stem in wanted]
    if wanted and len(paths) != len(wanted): sys.exit(f"unknown notebook(s): {sorted(set(wanted) - {p.stem for p in paths})}")
    times = read_times()
    for p in paths:
        print(f'running {p.name} ...', flush=True)
        times[p.stem] = run_one(p)
        shrink_outputs(p)
        stamp_run_time(p, times[p.stem])
        write_times({k: v for k, v in times.items() if (NBS/f'{k}.ipynb').exists()})   # kept if a later notebook fails
        print(f'  {times[p.stem]:.0f} s, outputs {output_bytes(p) / 1024:.0f} kB', flush=True)
    times = {k: v for k, v in times.items() if (NBS/f'{k}.ipynb').exists()}
    subprocess.run(['nbdev_clean'], cwd=ROOT, check=True)
    write_times(times)
    subprocess.run([sys.executable, str(ROOT/'tools'/'make_readme.py')], check=True)
    bad = check(times)
    for b in bad: print('over the limit:', b)
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
