#!/usr/bin/env bash
# Quick start: set up, check the bundled GPT spec, build it to out/gpt, and run the built model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
specc check specs/gpt.yaml
specc build specs/gpt.yaml -o out/gpt --run
