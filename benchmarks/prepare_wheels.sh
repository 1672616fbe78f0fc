#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (bitsandbytes, liger-kernel, unsloth and its needs) into .whl/
# at the repo root, trimmed so the whole folder stays well under the device tool's 64 MiB per-call limit.
#
# Run here (a machine with PyPI), from anywhere:  bash benchmarks/prepare_wheels.sh
# The GPU machine (torch 2.11, triton 3.6, transformers 5.17, peft 0.21, Python 3.12, CUDA 13.0) then installs
# them offline with benchmarks/gpu_env.sh. Pins: the versions the anchor measurements used, where they name one;
# the others are the newest that satisfy datasets 4.3.0 / unsloth 2026.10.9 constraints.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
EXCLUDE="$ROOT/.git/info/exclude"
if [ -d "$ROOT/.git" ] && ! grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null; then
    mkdir -p "$ROOT/.git/info"; echo '/.whl/' >> "$EXCLUDE"
fi

WHEELS=(
    bitsandbytes==0.50.2          # trimmed below to the CUDA 13.0 + CPU native libraries
    liger-kernel==0.8.5
    unsloth==2026.10.9            # trimmed below: drop studio/ (web UI, ~25 MB)
    unsloth_zoo==2026.10.9
    trl==1.15.0                   # unsloth needs trl<=1.15.0
    datasets==4.3.0               # unsloth: <5, not 4.4.*/4.5.0; not on the GPU machine at all
    dill==0.3.8                   # datasets 4.3.0: dill<0.4.1
    multiprocess==0.70.16         # datasets 4.3.0: multiprocess<0.70.17 (pairs with dill 0.3.8)
    tyro==1.0.16
    docstring_parser==0.18.0      # tyro
    shtab==1.13.0                 # tyro
    typeguard==4.6.0              # tyro
    cut_cross_entropy==25.1.1     # unsloth_zoo
    msgspec==0.22.0               # unsloth_zoo (native, cp312)
    json5==0.17.3                 # unsloth
    nest_asyncio==1.6.0           # unsloth
    structlog==26.1.0             # unsloth
)
# Not carried (the anchors ran without them; unsloth imports them lazily or optionally):
# xformers, torchao, diffusers, hf_transfer, pydantic.

PLATFORMS=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

for spec in "${WHEELS[@]}"; do
    name="${spec%%==*}"; ver="${spec##*==}"; norm="$(echo "$name" | tr 'A-Z-' 'a-z_')"
    if ls "$DEST"/"$norm"-"$ver"-*.whl >/dev/null 2>&1; then
        echo "have  $spec"; continue
    fi
    for old in "$DEST"/"$norm"-[0-9]*.whl; do  # another version: one version of each, or the install stops
        [ -e "$old" ] && { echo "drop  $(basename "$old")"; rm -f "$old"; }
    done
    echo "fetch $spec"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$DEST" "$spec" 2>&1 | grep -v "is ignored: it is neither" || true
done

# Repack a wheel without the members whose path matches DROP (a regex), rewriting RECORD to match.
"$PY" - "$DEST" <<'PYEOF'
import os, re, sys, zipfile, glob
dest = sys.argv[1]
TRIMS = {
    # keep only the CUDA 13.0 and CPU native libraries (the GPU machine has CUDA 13.0)
    "bitsandbytes-": r"^bitsandbytes/libbitsandbytes_(?!cuda130\.so$|cpu\.so$)[^/]+\.(so|dll|dylib)$",
    "unsloth-": r"^studio/",
}
for prefix, drop in TRIMS.items():
    for path in glob.glob(os.path.join(dest, prefix + "[0-9]*.whl")):
        pat = re.compile(drop)
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            gone = [n for n in names if pat.search(n)]
            if not gone:
                print(f"trimmed already  {os.path.basename(path)}")
                continue
            tmp = path + ".tmp"
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
                for info in z.infolist():
                    if pat.search(info.filename):
                        continue
                    data = z.read(info.filename)
                    if info.filename.endswith(".dist-info/RECORD"):
                        keep = [l for l in data.decode().splitlines() if not pat.search(l.split(",")[0])]
                        data = ("\n".join(keep) + "\n").encode()
                    out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        os.replace(tmp, path)
        print(f"trimmed {os.path.basename(path)}: dropped {len(gone)} files, now {os.path.getsize(path)/2**20:.1f} MiB")
PYEOF

# One version of each distribution, or the offline install stops.
dups="$(ls "$DEST" | grep '\.whl$' | sed -E 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
if [ -n "$dups" ]; then echo "ERROR: several versions of: $dups (remove the extra ones from $DEST)"; exit 1; fi

ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total $(( total / 1024 / 1024 )) MiB in $(ls "$DEST"/*.whl | wc -l) wheels ($total bytes)"
if [ "$total" -gt $(( 45 * 1024 * 1024 )) ]; then echo "WARNING: .whl/ is over 45 MiB"; fi
