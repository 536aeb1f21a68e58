#!/usr/bin/env bash
# Rebuilds models/pycode-22m/csd_bigram.npy, MaG's bigram fallback table for the pycode family.
# Corpus: Python code that is not the standard library (which the benchmarks hold out), taken
# from packages this project installs anyway: numpy and parts of transformers. The committed
# table was built with numpy 2.4.6 and transformers 5.24.0; other versions give a slightly
# different (equally valid) table. Any table keeps generation lossless: it only changes speed.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
csd build-bigram --tokenizer models/pycode-22m --output models/pycode-22m/csd_bigram.npy \
  "$site/numpy" "$site/transformers/generation" "$site/transformers/models/llama" \
  "$site/transformers/models/bert" "$site/transformers/models/t5" "$site/transformers/models/gpt2"
