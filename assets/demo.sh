#!/usr/bin/env bash
# The embedded demo: fit -> sample -> evaluate on assets/demo (2000 MNIST digits), offline, CPU.
# Usage: bash assets/demo.sh OUT_DIR   (expects `privsynth` on PATH; `make demo` arranges that)
# METHOD=privimage picks the other generator (recipes/demo-privimage.toml; `make demo-privimage`).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-demo-out}"
method="${METHOD:-dp-mepf}"
mkdir -p "$out"
start=$(date +%s)

echo "== 1/3 fit: spend epsilon=10 once on $here/demo/private" >&2
privsynth fit "$here/demo/private" --public "$here/demo/public" --method "$method" --epsilon 10 \
  --recipe "$here/../recipes/demo-${method//-/}.toml" --out "$out/run"

echo "== 2/3 sample: 500 synthetic digits (no privacy cost)" >&2
privsynth sample "$out/run" -n 500 --out "$out/synthetic" --seed 0

echo "== 3/3 evaluate against 500 real test digits" >&2
privsynth evaluate "$out/synthetic" --real "$here/demo/real-test" --out "$out/report"

privsynth verify "$out/synthetic" >&2
cat <<MSG

Demo finished in $(( $(date +%s) - start )) s.
  synthetic dataset : $out/synthetic   (ImageFolder + metadata.jsonl + MANIFEST.sha256)
  certificate       : $out/run/certificate.json   (plain words: $out/run/CERTIFICATE.md)
  quality report    : $out/report/report.json
MSG
