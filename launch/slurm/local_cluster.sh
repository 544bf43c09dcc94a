#!/bin/bash
# A one-node Slurm "cluster" on localhost, for the launch-script tests (pytest -m slurm) and
# for trying the sbatch files on a workstation. Debian 12: apt-get install slurmctld slurmd
# slurm-client munge (the Makefile does it). Idempotent: does nothing when Slurm answers.
#   launch/slurm/local_cluster.sh start | stop | status
set -euo pipefail
cmd=${1:-start}
conf_dir=/etc/slurm
state=/var/lib/slurm-zoo

answers() { timeout 5 sinfo -h >/dev/null 2>&1; }
# ready: the controller answers and the node takes jobs
ready() { case "$(timeout 5 sinfo -h -N -o %t 2>/dev/null | head -1)" in idle|mix|alloc|comp) return 0 ;; esac; return 1; }

case "$cmd" in
  status) ready && sinfo && exit 0; echo "slurm: not ready"; exit 1 ;;
  stop)
    pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x munged || true; exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

if ready; then exit 0; fi
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
mkdir -p "$conf_dir" "$state/ctld" "$state/d" /var/log/slurm /run/munge
# Containers have no systemd and often no cgroup v2 delegation: track processes through
# /proc (no cgroup.conf: Slurm 22.05 has no CgroupPlugin=disabled). task/affinity binds each
# task to its --cpus-per-task cores with sched_setaffinity, no cgroups needed, as clusters do.
# sbatch --wait polls the job every 2 s, then 8, then 32 s, unless 2 s is already a third of
# MinJobAge (Slurm's sbatch.c _job_wait): at the default 300 s a 12 s job returned after 42 s.
# 6 s keeps the 2 s poll; a finished job's record still lives >= 6 s for the tests' scontrol.
cat > "$conf_dir/slurm.conf" <<CONF
ClusterName=zoo-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskPluginParam=Cores
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
MinJobAge=6
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
pgrep -r R,S,D -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged" 2>/dev/null || /usr/sbin/munged --force
pgrep -r R,S,D -x slurmctld >/dev/null || slurmctld
pgrep -r R,S,D -x slurmd >/dev/null || slurmd
for i in $(seq 30); do
  if ready; then sinfo; exit 0; fi
  # a node marked down by an earlier, dead slurmd is brought back once slurmd answers again
  if [ "$i" -gt 2 ] && answers; then scontrol update nodename="$host" state=resume 2>/dev/null || true; fi
  sleep 1
done
echo "slurm did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
