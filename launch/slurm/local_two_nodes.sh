#!/bin/bash
# A second, private Slurm "cluster" of two nodes (n1, n2) on this one host, for the multi-node
# test (pytest -m slurm): two slurmd (`slurmd -N n1`, `-N n2`) on their own ports, a slurmctld on
# its own port, all under $dir. Talk to it with SLURM_CONF=$dir/slurm.conf. Needs munged (as
# launch/slurm/local_cluster.sh starts it). Idempotent.
#   launch/slurm/local_two_nodes.sh start | stop | conf
set -euo pipefail
cmd=${1:-start}
dir=/var/lib/slurm-zoo-two
export SLURM_CONF=$dir/slurm.conf
ready() { [ "$(timeout 5 sinfo -h -o %t 2>/dev/null | sort -u | tr '\n' ' ')" = "idle " ]; }

case "$cmd" in
  conf) echo "$SLURM_CONF"; exit 0 ;;
  stop)
    for f in "$dir"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done; exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop|conf" >&2; exit 2 ;;
esac
if ready; then exit 0; fi
host=$(hostname -s)
mkdir -p "$dir/ctld" "$dir/log"
# Each node offers all of this host's CPUs (the nodes share them).
# sbatch --wait polls the job every 2 s, then 8, then 32 s, unless 2 s is already a third of
# MinJobAge (Slurm's sbatch.c _job_wait): at the default 300 s a 12 s job returned after 42 s.
# 6 s keeps the 2 s poll; a finished job's record still lives >= 6 s for the tests' scontrol.
cat > "$SLURM_CONF" <<CONF
ClusterName=zoo-two
SlurmctldHost=$host
SlurmctldPort=7817
SlurmdPort=7818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/d-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MinJobAge=6
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=7821 CPUs=$(nproc) RealMemory=2000
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=7822 CPUs=$(nproc) RealMemory=2000
PartitionName=two Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
pgrep -x munged >/dev/null || { echo "munged is not running: launch/slurm/local_cluster.sh start first" >&2; exit 1; }
slurmctld -f "$SLURM_CONF"
sleep 1
slurmd -f "$SLURM_CONF" -N n1
slurmd -f "$SLURM_CONF" -N n2
for i in $(seq 30); do
  if ready; then sinfo; exit 0; fi
  [ "$i" -gt 3 ] && scontrol update nodename=n1,n2 state=resume 2>/dev/null || true
  sleep 1
done
echo "two-node slurm did not come up; see $dir/log/" >&2
exit 1
