#!/usr/bin/env bash
# Copies FILEs as they were at COMMIT into ab_base/ (or AB_DIR), for `scripts/gpu_check.sh ab`: the GPU
# machine gets the working tree (untracked files included) but maybe not the commit itself.
#
#   scripts/ab_prepare.sh COMMIT FILE...
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: scripts/ab_prepare.sh COMMIT FILE..." >&2; exit 2; }
commit=$1
shift
dir=${AB_DIR:-ab_base}
rm -rf "$dir"
for f in "$@"; do
  mkdir -p "$dir/$(dirname "$f")"
  git show "$commit:$f" >"$dir/$f"
done
echo "$dir/: $* as at $commit (remove it once the A/B has run)"
