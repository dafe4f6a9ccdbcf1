#!/usr/bin/env bash
# Build the wheel, install it (with constraints.txt) into a second fresh venv and smoke-test it from outside the
# source tree: `sae-unlearn doctor` (the embedded model, the shipped SAEs) and `sae-unlearn eval` on two probes per
# ring with embedded-small, so a file missing from the package data fails here rather than for a user.
# Needs .venv (scripts/setup.sh) to build with; the install reuses pip's cache, which that first install filled.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export SAE_UNLEARN_CACHE="${SAE_UNLEARN_CACHE:-$PWD/.cache/sae-unlearn}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
.venv/bin/python -m pip wheel -q --no-deps -w "$WORK/dist" . || { echo "wheel build failed"; exit 1; }
WHEEL=$(ls "$WORK"/dist/sae_unlearn-*.whl)
bash scripts/setup.sh "$WORK/venv" "$WHEEL" || { echo "wheel install failed"; exit 1; }

# smoke test from a directory that holds no source: the installed package and its data only
mkdir -p "$WORK/smoke" && cd "$WORK/smoke" || exit 1
SAE="$WORK/venv/bin/sae-unlearn"
"$WORK/venv/bin/python" - <<'EOF' || { echo "the wheel's sae_unlearn is not the installed one"; exit 1; }
import json
from importlib.resources import files

import sae_unlearn

assert "site-packages" in sae_unlearn.__file__, sae_unlearn.__file__
# two probes per ring of the built-in pack, read from the installed package
per_ring: dict[str, int] = {}
with open("probes.jsonl", "w") as out:
    for line in (files("sae_unlearn") / "concepts/packs/harry_potter/probes.jsonl").read_text().splitlines():
        ring = json.loads(line)["ring"]
        if per_ring.get(ring, 0) < 2:
            per_ring[ring] = per_ring.get(ring, 0) + 1
            out.write(line + "\n")
EOF
"$SAE" doctor || { echo "smoke test failed: sae-unlearn doctor (embedded model, shipped SAEs) from the wheel"; exit 1; }
"$SAE" eval --model embedded-small --concept harry-potter --probes probes.jsonl --fast \
  --no-letter --no-adversarial --no-relearn --out results.json ||
  { echo "smoke test failed: sae-unlearn eval from the wheel"; exit 1; }
"$WORK/venv/bin/python" -c "
import json, math
r = json.load(open('results.json'))
assert math.isfinite(r['retention']['generic_ppl']), r['retention']
print('wheel smoke test passed: generic ppl', round(r['retention']['generic_ppl'], 2))
" || { echo "smoke test failed: results.json lacks the generic-text perplexity"; exit 1; }
cd "$ROOT" || exit 1
