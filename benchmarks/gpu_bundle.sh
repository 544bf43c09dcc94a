#!/usr/bin/env bash
# Build .gpu/: what benchmarks/gpu.py needs on a GPU machine that has torch, lightning, timm and
# numba but no ffcv and no network (the device machines this project was measured on).
#   - ffcv's Python files, with its C extension rebuilt against Python's limited API (abi3), so
#     the one built here with Python 3.11 headers imports on that machine's Python 3.12;
#   - the shared libraries it links (libturbojpeg, OpenCV core/imgproc and theirs), minus libc,
#     libm, libstdc++, libgcc and zlib, which every machine has;
#   - jsonargparse and the two packages of its [signatures] extra (pure Python), for LightningCLI.
# Then, there:  PYTHONPATH=$PWD/.gpu/site:$PWD LD_LIBRARY_PATH=$PWD/.gpu/libs python3 benchmarks/gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf .gpu && mkdir -p .gpu/site .gpu/libs /tmp/ffcv-sdist
EXCLUDE=$(git rev-parse --git-path info/exclude)  # also in a git worktree, where .git is a file
mkdir -p "$(dirname "$EXCLUDE")"; grep -qx "/.gpu/" "$EXCLUDE" 2>/dev/null || echo "/.gpu/" >> "$EXCLUDE"
$PY -m pip download -q ffcv==1.0.2 --no-deps --no-binary :all: -d /tmp/ffcv-sdist
tar xzf /tmp/ffcv-sdist/ffcv-1.0.2.tar.gz -C /tmp/ffcv-sdist
cp -r "$SITE/ffcv" "$SITE"/ffcv-1.0.2.dist-info .gpu/site/
rm -f .gpu/site/ffcv/_libffcv.*.so
PYINC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
g++ -O3 -shared -fPIC -DPy_LIMITED_API=0x030B0000 -I"$PYINC" $(pkg-config --cflags opencv4 libturbojpeg) \
    /tmp/ffcv-sdist/ffcv-1.0.2/libffcv/libffcv.cpp -o .gpu/site/ffcv/_libffcv.abi3.so \
    -Wl,--as-needed -lopencv_imgproc -lopencv_core -lturbojpeg -lpthread
ldd .gpu/site/ffcv/_libffcv.abi3.so | awk '$3 ~ /^\// {print $3}' \
    | grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|libz)\.so' | xargs -I{} cp -L {} .gpu/libs/
# crop-only JPEG decoding (datamodules/jpeg_region.c; gpu_run.sh points ZOO_JPEG_REGION_LIB at it) and libjpeg
cc -O2 -shared -fPIC datamodules/jpeg_region.c -o .gpu/libs/jpeg_region.so $(pkg-config --cflags --libs libjpeg)
ldd .gpu/libs/jpeg_region.so | awk '$3 ~ /^\// {print $3}' \
    | grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|libz)\.so' | xargs -I{} cp -L {} .gpu/libs/
for p in jsonargparse docstring_parser typeshed_client; do cp -r "$SITE/$p" "$SITE/$p"-*.dist-info .gpu/site/; done
find .gpu -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu
