"""datamodules/ffcv_io/_compat.py: the uses of ffcv's internals behave as the plain ffcv they
replace. Each test runs the patched side in a subprocess, as `zoo fit` imports ffcv."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.helpers import run

pytest.importorskip("ffcv")

# Writes a mixed JPEG/raw .beton through import_ffcv (IMAGE_MODES a plain dict) and decodes its
# validation batches; prints what the parent compares.
_PATCHED = r"""
import json, sys
import numba.typed
from datamodules.ffcv_io import _compat
_compat.import_ffcv()
import ffcv.fields.rgb_image as rgb
from datamodules import ffcv_io
import numpy as np
folder, beton, out = sys.argv[1:4]
ffcv_io.write_beton(folder, beton, max_resolution=64, compress_probability=0.5, num_workers=1, progress=False)
loader = ffcv_io.make_loader(beton, {"image": ffcv_io.val_image_pipeline(32, 0.875), "label": ffcv_io.label_pipeline()},
                             batch_size=4, num_workers=1, order="sequential", drop_last=False)
np.save(out, np.concatenate([x.numpy() for x, _ in loader]))
print(json.dumps({"modes": type(rgb.IMAGE_MODES).__name__, "dict_after": numba.typed.Dict.__name__}))
"""


@pytest.mark.slow
def test_import_ffcv_with_plain_image_modes_decodes_as_ffcv_does(tiny_imagenet, tmp_path):
    from datamodules import ffcv_io

    beton, out = tmp_path / "val.beton", tmp_path / "patched.npy"
    p = run([sys.executable, "-c", _PATCHED, tiny_imagenet / "val", beton, out])
    assert p.returncode == 0, p.stderr[-2000:]
    seen = json.loads(p.stdout.strip().splitlines()[-1])
    assert seen == {"modes": "dict", "dict_after": "Dict"}  # patched for the import only
    meta = ffcv_io.read_sidecar(beton)
    assert meta["num_samples"] == 9
    # this process imported ffcv as it is (a numba typed Dict): the same file decodes to the same pixels
    loader = ffcv_io.make_loader(beton, {"image": ffcv_io.val_image_pipeline(32, 0.875), "label": ffcv_io.label_pipeline()},
                                 batch_size=4, num_workers=1, order="sequential", drop_last=False)
    plain = np.concatenate([x.numpy() for x, _ in loader])
    np.testing.assert_array_equal(np.load(out), plain)

