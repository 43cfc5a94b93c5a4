#!/usr/bin/env bash
# The merge check: a model written by `coordinator merge` loads in transformers with the merged dtype, keeps its
# float config values, and gives the logits of the QLoRA model it came from (dqlora's, computed here).
# Here (needs Node):             bash bench/merge-check/run.sh prepare   → runs/merge-check/ (git-ignored, self-contained)
# On the GPU machine (transformers 5.17 + torch, no Node), device run with carry ["runs/merge-check"]:
#                                python3 runs/merge-check/check.py runs/merge-check
set -euo pipefail
cd "$(dirname "$0")/../.."
node --import tsx bench/merge-check/prepare.ts runs/merge-check
cp bench/merge-check/check.py runs/merge-check/
du -sh runs/merge-check
