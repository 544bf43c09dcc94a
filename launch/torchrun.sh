#!/bin/bash
# Multi-GPU training without Slurm: torchrun starts one process per GPU and Lightning picks up
# its environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...).
#
# One node, 8 GPUs:
#   launch/torchrun.sh 8 launch/recipes/resnet50.yaml --data.root /data/imagenet
# Several nodes: the same command on every node; HOST:PORT is one of them (it hosts the
# rendezvous), the id names this run to the rendezvous (any string the nodes share):
#   launch/torchrun.sh --nnodes 4 --rdzv node01:29500 --rdzv-id resnet50-a 8 launch/recipes/resnet50.yaml ...
#
# Options (before NUM_GPUS): --nnodes N (default 1), --rdzv HOST:PORT (needed with N > 1),
# --rdzv-id ID (default: $SLURM_JOB_ID or "zoo"), --rdzv-timeout SECONDS (default 300: how long
# a node waits for HOST and for the others before it gives up with an error).
# Lightning can also start the processes of one node itself: `zoo fit --trainer.devices 8`.
set -euo pipefail
usage="usage: torchrun.sh [--nnodes N --rdzv HOST:PORT [--rdzv-id ID] [--rdzv-timeout S]] NUM_GPUS RECIPE.yaml [zoo fit arguments...]"
nnodes=1 rdzv="" rdzv_id=${SLURM_JOB_ID:-zoo} timeout=300
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) nnodes=$2; shift 2 ;;
    --rdzv) rdzv=$2; shift 2 ;;
    --rdzv-id) rdzv_id=$2; shift 2 ;;
    --rdzv-timeout) timeout=$2; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) break ;;
  esac
done
ngpus=${1:?$usage}
config=${2:?$usage}
shift 2
[ -f "$config" ] || { echo "error: recipe $config not found; see launch/recipes/" >&2; exit 2; }
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
cd "$(dirname "$0")/.."
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python

if [ "$nnodes" = 1 ]; then
  exec "$py" -m torch.distributed.run --standalone --nproc-per-node "$ngpus" \
    -m launch.cli fit --config "$config" --trainer.devices "$ngpus" --trainer.num_nodes 1 "$@"
fi

[ -n "$rdzv" ] || { echo "error: --nnodes $nnodes needs --rdzv HOST:PORT (one of the nodes, the same on all)" >&2; exit 2; }
host=${rdzv%:*} port=${rdzv##*:}
# A node that is not HOST waits for HOST's rendezvous port, then says clearly that it is
# unreachable (torchrun itself ends in a long RendezvousConnectionError traceback).
is_local() {
  case "$1" in localhost|127.*|::1) return 0 ;; esac
  [ "$1" = "$(hostname)" ] || [ "$1" = "$(hostname -s)" ] || [ "$1" = "$(hostname -f 2>/dev/null)" ] && return 0
  for a in $(hostname -I 2>/dev/null); do [ "$1" = "$a" ] && return 0; done
  return 1
}
if ! is_local "$host"; then
  deadline=$(( SECONDS + timeout ))
  until timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      echo "error: rendezvous endpoint $host:$port not reachable after ${timeout}s: start this command on $host first, or check the host name, the port and the firewall" >&2
      exit 2
    fi
    sleep 1
  done
fi
exec "$py" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$ngpus" \
  --rdzv-backend c10d --rdzv-endpoint "$rdzv" --rdzv-id "$rdzv_id" --rdzv-conf "join_timeout=$timeout" \
  -m launch.cli fit --config "$config" --trainer.devices "$ngpus" --trainer.num_nodes "$nnodes" "$@"
