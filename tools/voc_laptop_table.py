"""The real-photo table of `tools/voc_laptop.sh` runs: mIoU of baseline CAM, SEAM CAM and SEAM PCM on `train` and
`val` (at the fixed alpha, at the alpha chosen without ground truth, and at the alpha tuned on it), training throughput, peak memory and SEAM's step-time ratio.
With several run folders (seeds), each number is the mean ± standard deviation over them.

    python tools/voc_laptop_table.py OUT [OUT ...]
"""
import json, sys
from pathlib import Path
import numpy as np

ROWS = (('baseline CAM', 'baseline', 'cam'), ('SEAM CAM', 'seam', 'cam'), ('SEAM PCM', 'seam', 'pcm'))


def read(path):
    try: return json.loads(Path(path).read_text())
    except FileNotFoundError: return None


def fmt(vals, scale=1., digits=1):
    vals = [scale * v for v in vals if v is not None]
    if not vals: return '—'
    return f"{np.mean(vals):.{digits}f}" + (f" ± {np.std(vals):.{digits}f}" if len(vals) > 1 else '')


def main(outs):
    lines = ['| row | train, fixed α 0.26 | train, α without GT | train, best α (tuned on GT) | val, fixed α | val, α without GT '
             '| val, best α | train img/s | peak MB |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for label, method, kind in ROWS:
        cells = []
        for split in ('train', 'val'):
            ms = [read(Path(o)/'eval'/method/split/kind/'metrics.json') for o in outs]
            cells.append(fmt([m and m['fixed']['miou'] for m in ms], 100))
            for key in ('no_ground_truth', 'tuned_on_ground_truth'):
                pts = [m and m.get(key) for m in ms]
                alphas = sorted({p['alpha'] for p in pts if p})
                cells.append(fmt([p and p['miou'] for p in pts], 100) + (f" (α {', '.join(f'{a:g}' for a in alphas)})" if alphas else ''))
        s = [read(Path(o)/'train'/method/'summary.json') for o in outs]
        cells += [fmt([x and x['images_per_s'] for x in s]), fmt([x and x.get('peak_memory_mb') for x in s], digits=0)]
        lines.append(f"| {label} | " + ' | '.join(cells) + ' |')
    b = [read(Path(o)/'train'/'baseline'/'summary.json') for o in outs]
    s = [read(Path(o)/'train'/'seam'/'summary.json') for o in outs]
    ratios = [x['images_per_s'] / y['images_per_s'] for x, y in zip(b, s) if x and y]
    print('\n'.join(lines))
    if ratios: print(f"\nSEAM's step time / baseline's: {fmt(ratios, digits=2)} ({len(ratios)} run(s): {', '.join(map(str, outs))})")


if __name__ == '__main__':
    if len(sys.argv) < 2: sys.exit(__doc__)
    main(sys.argv[1:])
