"Fixtures shared by several test files."
from pathlib import Path
import pytest


@pytest.fixture(scope='module')
def aff_shapes(tmp_path_factory):
    """A seam_nb_infer-like folder for eight Shapes images (stand-in CAMs in pcm/, their CRF scores and labels in
    crf_4/, crf_24/, label_crf_4/, label_crf_24/ as seam_nb_crf writes them) and a 2-step tiny AffinityNet run trained
    from it (used by test_affinity.py and test_random_walk.py)."""
    from seam_nb.core import save_cam_npz
    from seam_nb.shapes import ShapesSource
    from seam_nb.affinity import synthetic_cams
    from seam_nb.crf import crf_stage
    from seam_nb import affinity_train as AT
    root = tmp_path_factory.mktemp('shapes')
    src = ShapesSource(8, 128, seed=0)
    for n in src.names: save_cam_npz(root/'infer'/'pcm'/f'{n}.npz', synthetic_cams(src.mask(n)))
    crf_stage(src, root/'infer'/'pcm', root/'infer', progress=False)
    cam_dir, la_dir, ha_dir = AT.resolve_infer_dir(root/'infer')
    cfg = AT.make_aff_config('shapes_cpu', la_dir=la_dir, ha_dir=ha_dir, n_images=8, out=str(root/'run'), steps=2,
                             batch_size=2, crop=64, progress=False, device='cpu')
    AT.train_affinity(cfg)
    return root, src
