#!/bin/bash
# Single-node multi-GPU training without Slurm: torchrun starts one process per GPU and
# Lightning picks up its environment (LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...).
#
#   launch/torchrun.sh 8 launch/recipes/resnet50.yaml --data.root /data/imagenet
#
# Lightning can also start the processes itself: `zoo fit --config ... --trainer.devices 8`.
set -euo pipefail
ngpus=${1:?usage: torchrun.sh NUM_GPUS RECIPE.yaml [zoo fit arguments...]}
config=${2:?usage: torchrun.sh NUM_GPUS RECIPE.yaml [zoo fit arguments...]}
shift 2
cd "$(dirname "$0")/.."
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" -m torch.distributed.run --standalone --nproc_per_node "$ngpus" \
  -m launch.cli fit --config "$config" --trainer.devices "$ngpus" "$@"
