#!/bin/bash
# One inversion over several machines with torchrun: run this on every machine, NODE_RANK 0 on
# the one whose address is MASTER_ADDR. The run folder must be on a file system all of them see.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS=4 scripts/torchrun_invert.sh configs/sd15.yaml /data/images /shared/runs/big
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 GPUS=4 scripts/torchrun_invert.sh configs/sd15.yaml /data/images /shared/runs/big
#
# Options after the three arguments go to `ph2p invert` (e.g. --model.steps 100).
set -euo pipefail
CONFIG=${1:?usage: torchrun_invert.sh CONFIG IMAGE_FOLDER RUN_FOLDER}
IMAGES=${2:?usage: torchrun_invert.sh CONFIG IMAGE_FOLDER RUN_FOLDER}
RUN=${3:?usage: torchrun_invert.sh CONFIG IMAGE_FOLDER RUN_FOLDER}
torchrun --nnodes "${NNODES:?}" --node_rank "${NODE_RANK:?}" --nproc_per_node "${GPUS:-1}" \
    --master_addr "${MASTER_ADDR:?}" --master_port "${MASTER_PORT:-29500}" \
    -m ph2p_lit.cli invert --config "$CONFIG" --data.root "$IMAGES" --trainer.default_root_dir "$RUN" \
    --trainer.num_nodes "$NNODES" --trainer.devices "${GPUS:-1}" --trainer.strategy ddp "${@:4}"
