"""Documentation cannot drift from the command line: every command the README and the notebooks show is parsed by
its console script's own parser, and the ones that fit on a CPU run, shrunk to tiny sizes."""
import configparser, importlib, json, os, re, shlex, subprocess, sys
from pathlib import Path
import pytest
from seam_nb.core import dashed_to_underscored, REBUILD

ROOT = Path(__file__).resolve().parents[1]

def console_scripts() -> dict:
    "console script name -> module name, from settings.ini"
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    pairs = [l.strip().split('=') for l in cfg['DEFAULT']['console_scripts'].splitlines() if l.strip()]
    return {name: target.split(':')[0].split('.')[-1] for name, target in pairs}

SCRIPTS = console_scripts()
MODULE_SCRIPT = {m: s for s, m in SCRIPTS.items()}

def documents() -> dict:
    "name -> text of every place a reader sees commands: the README and the markdown of the notebooks"
    docs = {'README.md': (ROOT/'README.md').read_text()}
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        cells = json.loads(nb.read_text())['cells']
        docs[nb.name] = '\n\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    docs['core.REBUILD'] = '\n'.join(f'`{v}`' for v in REBUILD.values())
    return docs

def snippets(text:str) -> list:
    "(shell text, is it a code block) from fenced code blocks and from inline code spans that start with a command."
    out = []
    for block in re.findall(r'```(?:bash|sh|shell|console)?\n(.*?)```', text, re.S):
        out.append((re.sub(r'\\\n\s*', ' ', block), True))
    text = re.sub(r'```.*?```', '', text, flags=re.S)
    out += [(m, False) for m in re.findall(r'`([^`\n]+)`', text) if re.match(r'(seam_nb_\w+|python -m seam_nb|torchrun|pip install)', m)]
    return out

def parse_command(words:list):
    "(module, args) if `words` run one of our commands, else None."
    if not words: return None
    if words[0] in SCRIPTS: return SCRIPTS[words[0]], words[1:]
    if '-m' in words and words[0] in ('python', 'torchrun', 'python3'):
        i = words.index('-m')
        if i + 1 < len(words) and re.fullmatch(r'seam_nb\.\w+', words[i + 1]): return words[i + 1].split('.')[1], words[i + 2:]
    return None

def without_ellipses(args:list) -> list:
    "`...` stands for a value after an option (kept as a placeholder) or for more options (dropped)."
    return [('PLACEHOLDER' if i and args[i - 1].startswith('--') else None) if a == '...' else a for i, a in enumerate(args)
            if a != '...' or (i and args[i - 1].startswith('--'))]

def commands() -> list:
    "(where, module, args, line, from a code block) for every documented command of ours"
    found = []
    for where, text in documents().items():
        for snip, block in snippets(text):
            for line in snip.splitlines():
                for part in re.split(r'&&|;|\|', line):
                    try: words = shlex.split(part, comments=True)
                    except ValueError: continue
                    cmd = parse_command(words)
                    if cmd: found.append((where, cmd[0], without_ellipses(cmd[1]), part.split('#')[0].strip(), block))
    return found

ALL = commands()

def test_commands_are_found():
    mods = {m for _, m, _, _, _ in ALL}
    assert {'pipeline', 'train', 'infer', 'evaluate', 'crf', 'affinity_train', 'random_walk', 'retrain'} <= mods, mods
    assert len(ALL) > 30

@pytest.mark.parametrize('where,mod,args,line,block', ALL, ids=[f'{w}:{l[:60]}' for w, _, _, l, _ in ALL])
def test_documented_command_parses(where, mod, args, line, block):
    main = importlib.import_module(f'seam_nb.{mod}').main
    try: main.parser().parse_args(dashed_to_underscored(args))
    except SystemExit as e: pytest.fail(f"{where}: `{line}` is rejected by {MODULE_SCRIPT.get(mod, mod)} (exit {e.code})")

def test_the_parser_rejects_what_it_should():
    main = importlib.import_module('seam_nb.train').main
    with pytest.raises(SystemExit): main.parser().parse_args(['--no_such_option', '1'])

# ---- the documented Shapes commands, run for real on tiny inputs ----------------------------------------------------
# Only paths, sizes and steps are overridden (appended last, so they win); anything needing VOC, a GPU or the
# authors' weights is left to the parse test above.
SHRINK = {'train': ['--steps', '2', '--batch_size', '2', '--n_images', '4', '--image_size', '64', '--crop', '48',
                    '--resize_long', '48,64', '--device', 'cpu', '--no_progress'],
          'infer': ['--scales', '1.0', '--no_progress', '--device', 'cpu'],
          'crf': ['--no_progress'],
          'affinity_train': ['--steps', '2', '--batch_size', '2', '--crop', '48', '--device', 'cpu', '--no_progress'],
          'random_walk': ['--device', 'cpu', '--no_progress'],
          'retrain': ['--steps', '2', '--batch_size', '2', '--crop', '48', '--n_images', '4', '--image_size', '64', '--device', 'cpu',
                      '--no_progress'],
          'pipeline': ['--quick', '--no_progress'],
          'evaluate': []}
NEEDS_MORE = ('voc', 'VOC', 'cuda', '.params', 'resnet38_SEAM', 'resnet38_aff', '$', 'torchrun', '...', 'seam_nb_bench',
              'seam_nb_pretext')

def runnable() -> list:
    "The documented commands of the Shapes pipeline from code blocks, once each, in reading order (README first)."
    out, seen = [], set()
    for where, mod, args, line, block in ALL:
        if not block or where == 'index.ipynb' or mod not in SHRINK or any(k in line for k in NEEDS_MORE): continue
        if '--seeds' in args:                                        # one seed is enough to run the benchmark's path
            i = args.index('--seeds'); j = i + 1
            while j < len(args) and args[j].isdigit(): j += 1
            args = args[:i] + ['--seeds', '0'] + args[j:]
        args = [a.lstrip('/').replace('/', '_') if a.startswith('/tmp/') else a for a in args]   # stay in the test's folder
        args = [str(ROOT/a) if a.startswith('data/') else a for a in args]                      # the checkout's shipped files
        key = (mod, tuple(args))
        if key not in seen: seen.add(key); out.append((where, mod, args + SHRINK[mod], line))
    return out

def test_documented_shapes_commands_run(tmp_path):
    "Run the documented Shapes commands in one folder, in order: later ones read what earlier ones wrote, as a reader's would."
    env = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')
    cmds = runnable()
    assert {'train', 'infer', 'crf', 'affinity_train', 'random_walk', 'retrain', 'pipeline'} <= {m for _, m, _, _ in cmds}
    failures = []
    for where, mod, args, line in cmds:
        r = subprocess.run([sys.executable, '-m', f'seam_nb.{mod}', *args], cwd=tmp_path, capture_output=True, text=True,
                           env=env, timeout=600)
        if r.returncode: failures.append(f"{where}: `{line}` -> exit {r.returncode}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    assert not failures, '\n'.join(failures)
