#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian's slurmctld/slurmd/munge), for tests and trials.
#
#   slurm/local-cluster.sh start  STATE_DIR [--gpus N]   # install if missing, configure, start (idempotent)
#   slurm/local-cluster.sh stop   STATE_DIR              # cancel its jobs, stop the daemons it started
#   slurm/local-cluster.sh status STATE_DIR
#   export SLURM_CONF=STATE_DIR/slurm.conf               # then sbatch/squeue/scontrol talk to it
#
# Everything (slurm.conf, gres.conf, state, spool, logs, PID files, fake GPU devices) lives under STATE_DIR;
# the controller and node ports are picked free at the first start and kept in STATE_DIR/ports, so several
# clusters can coexist on one machine. `start` on a running cluster does not restart it (jobs keep
# running); it only resumes a drained node that runs nothing. Needs root (as the daemons run as root).
# --gpus N advertises N fake GPUs (character devices cloned from /dev/null; Slurm then sets
# CUDA_VISIBLE_DEVICES), so scripts with `#SBATCH --gres=gpu:1` run unmodified. Follows
# ../shared/notes/slurm-single-node.md (tested facts and pitfalls of a one-node Slurm 22.05 on Debian 12).
set -euo pipefail

die() { echo "local-cluster: $*" >&2; exit 1; }
usage() { echo "usage: $0 start|stop|status STATE_DIR [--gpus N]" >&2; exit 2; }

[[ $# -ge 2 ]] || usage
cmd=$1
state=$2
shift 2
gpus=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --gpus) gpus=${2:?--gpus needs a number}; shift 2 ;;
    *) usage ;;
  esac
done
[[ $gpus =~ ^[0-9]+$ ]] || die "--gpus: '$gpus' is not a number"
mkdir -p "$state"
state=$(cd "$state" && pwd)
conf=$state/slurm.conf
export SLURM_CONF=$conf

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  for b in slurmctld slurmd sbatch squeue scontrol sinfo munged; do
    command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || missing+=("$b")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]} and not root: install slurmctld slurmd slurm-client munge"
  echo "local-cluster: installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})" >&2
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      slurmctld slurmd slurm-client munge; } >"$state/apt.log" 2>&1 \
    || die "could not install the Slurm packages (see $state/apt.log: $(tail -n 1 "$state/apt.log"))"
}

start_munge() {
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  # one munged per machine serves every cluster; each cluster registers itself under /run/munge/clusters
  mkdir -p /run/munge/clusters
  touch "/run/munge/clusters/$(echo "$state" | md5sum | cut -c1-16)"
  if alive /run/munge/munged.pid; then return 0; fi
  runuser -u munge -- /usr/sbin/munged || die "munged did not start"
  cp /run/munge/munged.pid /run/munge/clusters.munged.pid  # started by this script: the last cluster stops it
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

write_config() {
  local cpus mem ports
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS: not the node size
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
  [[ -s $state/ports ]] || echo "$(free_port) $(free_port)" >"$state/ports"
  read -r ctld_port slurmd_port <"$state/ports"
  mkdir -p "$state/ctld" "$state/spool" "$state/log"
  local gres_line="" gres_types=""
  if [[ $gpus -gt 0 ]]; then
    mkdir -p "$state/dev"
    for ((i = 0; i < gpus; i++)); do
      [[ -c $state/dev/gpu$i ]] || mknod "$state/dev/gpu$i" c 1 3
    done
    gres_types="GresTypes=gpu"
    gres_line=" Gres=gpu:$gpus"
    echo "NodeName=localhost Name=gpu File=$state/dev/gpu[0-$((gpus - 1))]" >"$state/gres.conf"
  else
    : >"$state/gres.conf"
  fi
  cat >"$conf" <<EOF
# written by slurm/local-cluster.sh
ClusterName=ci
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/log/jobcomp.txt
MinJobAge=600
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
$gres_types
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem$gres_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n 1; }

wait_idle() {
  local s=""
  for _ in $(seq 1 60); do
    s=$(node_state)
    case $s in
      idle|mixed|allocated*) return 0 ;;
    esac
    sleep 0.5
  done
  die "the node did not come up (state '${s:-none}'; see $state/log/slurmctld.log and slurmd.log, sinfo -R)"
}

start() {
  install_packages
  if alive "$state/slurmctld.pid" && alive "$state/slurmd.pid"; then
    local s
    s=$(node_state)
    case $s in
      idle|mixed|allocated*) echo "local-cluster: already running ($s) at $conf: not restarted" >&2; return 0 ;;
      *)
        if [[ -z $(squeue -h -o %i 2>/dev/null) ]]; then
          scontrol update NodeName=localhost State=RESUME 2>/dev/null || true
          wait_idle
          echo "local-cluster: running at $conf (node resumed from '$s')" >&2
          return 0
        fi
        die "cluster at $conf runs jobs but its node is '$s'; not touching it (see sinfo -R)" ;;
    esac
  fi
  start_munge
  write_config
  alive "$state/slurmctld.pid" || /usr/sbin/slurmctld -f "$conf" || die "slurmctld did not start (see $state/log/slurmctld.log)"
  alive "$state/slurmd.pid" || /usr/sbin/slurmd -f "$conf" -N localhost || die "slurmd did not start (see $state/log/slurmd.log)"
  wait_idle
  echo "local-cluster: running at $conf ($(nproc) CPUs, $gpus fake GPUs); export SLURM_CONF=$conf" >&2
}

stop_pid() {  # stop a daemon by its PID file, waiting up to 10 s
  local file=$1 pid
  alive "$file" || return 0
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}

stop() {
  [[ -f $conf ]] || { echo "local-cluster: no cluster at $state" >&2; return 0; }
  if alive "$state/slurmctld.pid"; then
    scancel --quiet --user "$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 20); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
  fi
  stop_pid "$state/slurmd.pid"
  stop_pid "$state/slurmctld.pid"
  rm -f "/run/munge/clusters/$(echo "$state" | md5sum | cut -c1-16)"
  # munged serves every cluster on the machine: the last one stops it, if one of these scripts started it
  if [[ -z $(ls -A /run/munge/clusters 2>/dev/null) && -s /run/munge/clusters.munged.pid ]] \
     && [[ $(cat /run/munge/clusters.munged.pid) == "$(cat /run/munge/munged.pid 2>/dev/null)" ]]; then
    stop_pid /run/munge/munged.pid
    rm -f /run/munge/clusters.munged.pid
  fi
  echo "local-cluster: stopped ($state)" >&2
}

status() {
  if alive "$state/slurmctld.pid" && alive "$state/slurmd.pid"; then
    echo "running: node $(node_state), jobs $(squeue -h -o %i | wc -l), SLURM_CONF=$conf"
  else
    echo "stopped"
    return 3
  fi
}

case $cmd in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
