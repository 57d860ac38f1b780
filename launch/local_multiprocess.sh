#!/usr/bin/env bash
# Runs N cooperating JAX processes of one command on this machine (multi-process training without a
# cluster: tests, debugging the multi-host code path, or one process per GPU on a single box).
#
#   launch/local_multiprocess.sh [-n N] [-p PORT] [-d CPU_DEVICES] [-g] [-l LOG_DIR] [-k GRACE_S] -- CMD...
#
#   -n N            number of processes (default 2)
#   -p PORT         coordinator port on localhost (default: a free port)
#   -d K            simulate K CPU devices per process (sets JAX_PLATFORMS=cpu, XLA's host device count
#                   and gloo CPU collectives); leave out on GPU/TPU machines
#   -g              give process i only GPU i (CUDA_VISIBLE_DEVICES=i)
#   -l LOG_DIR      write process i's stdout+stderr to LOG_DIR/process_<i>.log (default: this terminal,
#                   each line prefixed with [i])
#   -k GRACE_S      when one process fails, seconds the others get after SIGTERM before SIGKILL (default 5)
#
# Every process gets PATCH_DIFFUSION_COORDINATOR=localhost:PORT, PATCH_DIFFUSION_NUM_PROCESSES=N and
# PATCH_DIFFUSION_PROCESS_ID=i, which patch_diffusion.main turns into jax.distributed.initialize(...).
# Example (2 processes x 4 simulated CPU devices = one 8-device mesh):
#
#   launch/local_multiprocess.sh -n 2 -d 4 -- \
#     python3 -m patch_diffusion.main --config=configs/tiny_test.py --workdir=/tmp/tiny_2proc
#
# The launcher waits for all processes. If one exits non-zero, the others are stopped (SIGTERM, then
# SIGKILL after the grace period: a survivor would otherwise block forever in a collective with the dead
# one) and the launcher exits with the failing process's code (128+signal for a signal). SIGTERM/SIGINT
# sent to the launcher are forwarded to every process (the trainer saves a checkpoint and exits 0).
set -uo pipefail

num=2 port="" cpu_devices="" gpu_per_process=0 log_dir="" grace=5
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while getopts "n:p:d:gl:k:h" opt; do
  case "$opt" in
    n) num="$OPTARG" ;;
    p) port="$OPTARG" ;;
    d) cpu_devices="$OPTARG" ;;
    g) gpu_per_process=1 ;;
    l) log_dir="$OPTARG" ;;
    k) grace="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then
  echo "local_multiprocess.sh: no command given (put it after --)" >&2
  usage
fi
if ! [[ "$num" =~ ^[1-9][0-9]*$ ]]; then
  echo "local_multiprocess.sh: -n needs a positive integer, got '$num'" >&2
  exit 2
fi
if [[ -z "$port" ]]; then
  # A port nobody listens on now (portpicker when installed, else the kernel's choice).
  port="$("${PYTHON:-python3}" -c 'import socket
try:
  import portpicker; print(portpicker.pick_unused_port())
except ImportError:
  s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1]); s.close()')" || exit 1
fi
[[ -n "$log_dir" ]] && mkdir -p "$log_dir"

export PATCH_DIFFUSION_COORDINATOR="localhost:$port" PATCH_DIFFUSION_NUM_PROCESSES="$num"
if [[ -n "$cpu_devices" ]]; then
  export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$cpu_devices"
fi

declare -A pid_of=()  # pid -> process index
pids=()
for ((i = 0; i < num; i++)); do
  (
    export PATCH_DIFFUSION_PROCESS_ID="$i"
    [[ "$gpu_per_process" == 1 ]] && export CUDA_VISIBLE_DEVICES="$i"
    if [[ -n "$log_dir" ]]; then
      exec "$@" >"$log_dir/process_$i.log" 2>&1
    else
      exec "$@" > >(sed -u "s/^/[$i] /") 2>&1
    fi
  ) &
  pid_of[$!]=$i
  pids+=("$!")
done
echo "local_multiprocess.sh: started $num processes (coordinator localhost:$port): ${pids[*]}" >&2

stop_all() {  # $1: signal for the first round
  local sig="$1" p
  for p in "${running[@]+"${running[@]}"}"; do kill -s "$sig" "$p" 2>/dev/null; done
}
forward() {
  echo "local_multiprocess.sh: received $1, forwarding to all processes" >&2
  stop_all "$1"
}
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
running=("${pids[@]}")
# Poll instead of `wait -n`: bash's `wait -n PID...` refuses PIDs that were already reaped, while
# `wait PID` of a finished child reliably returns its saved exit status.
while ((${#running[@]} > 0)); do
  still=()
  for p in "${running[@]}"; do
    if kill -0 "$p" 2>/dev/null; then
      still+=("$p")
      continue
    fi
    wait "$p"
    rc=$?
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local_multiprocess.sh: process ${pid_of[$p]} (pid $p) exited with $rc; stopping the others" >&2
      stop_all TERM
      (sleep "$grace"; stop_all KILL) &
      killer=$!
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  ((${#running[@]} > 0)) && sleep 0.2
done
[[ -n "${killer:-}" ]] && kill "$killer" 2>/dev/null
exit "$status"
