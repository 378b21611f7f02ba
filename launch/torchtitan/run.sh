#!/usr/bin/env bash
# torchtitan's own trainer with SOAP: its llama3 debug model, SOAP in place of AdamW.
#
#   NGPU=8 launch/torchtitan/run.sh [torchtitan options, e.g. --parallelism.tensor_parallel_degree 2]
#
# Needs a full torchtitan install (pip install 'distsoap[torchtitan]', CUDA) and the tokenizer
# assets its debug config names. --module imports distsoap.integrations.torchtitan, which
# registers optimizer_name="SOAP", and --config takes its llama3_debugmodel_soap().
set -euo pipefail
exec torchrun --standalone --nproc_per_node="${NGPU:-8}" -m torchtitan.train \
  --module distsoap.integrations.torchtitan --config llama3_debugmodel_soap "$@"
