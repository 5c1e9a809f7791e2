#!/usr/bin/env bash
# Rehearse a multi-host run on one machine: N local `llmcxr train` processes on CPU devices that
# join one jax.distributed job (gloo collectives), exactly as N TPU/GPU hosts would.
#
#   launch/local_multiprocess.sh N [llmcxr train arguments...]
#   launch/local_multiprocess.sh 2 --config configs/llmcxr_stage1.py:tiny --workdir runs/mp \
#       --config.data.num_shards=2 --config.train.mesh=-1,1,1
#
# Environment: LLMCXR_DEVICES_PER_PROCESS (CPU devices per process, default 1),
# LLMCXR_COORDINATOR_PORT (default: a free port), LLMCXR_LOG_DIR (default WORKDIR/logs, else
# ./local_multiprocess_logs), LLMCXR_BIN (default llmcxr), LLMCXR_KILL_GRACE (seconds the others
# get to checkpoint after one process fails, then SIGKILL; default 30).
# Logs: LOG_DIR/process_<i>.log. Exit status: 0 when every process exits 0, else the first
# failure's status (the rest are stopped). SIGINT / SIGTERM are forwarded as SIGTERM, which makes
# each trainer save a checkpoint and exit; rerun the same command to resume.
set -uo pipefail

usage="usage: $(basename "$0") N [llmcxr train arguments...]"
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "$usage" >&2
    exit 2
fi
n=$1
shift
devices=${LLMCXR_DEVICES_PER_PROCESS:-1}
if ! [[ "$devices" =~ ^[1-9][0-9]*$ ]]; then
    echo "local_multiprocess.sh: LLMCXR_DEVICES_PER_PROCESS=$devices must be a positive integer" >&2
    exit 2
fi
bin=${LLMCXR_BIN:-llmcxr}
grace=${LLMCXR_KILL_GRACE:-30}

workdir=
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --workdir) workdir=${args[i + 1]:-} ;;
        --workdir=*) workdir=${args[i]#--workdir=} ;;
    esac
done
log_dir=${LLMCXR_LOG_DIR:-${workdir:+$workdir/logs}}
log_dir=${log_dir:-local_multiprocess_logs}
mkdir -p "$log_dir" || exit 2

free_port='import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])'
port=${LLMCXR_COORDINATOR_PORT:-$(python3 -c "$free_port")}
# this script's device count wins over one already in XLA_FLAGS
xla_flags=$(echo "${XLA_FLAGS:-}" |
    sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/ +/ /g; s/^ //; s/ $//')
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"

pids=()
stop_all() {  # $1: signal
    for pid in "${pids[@]}"; do
        kill "-$1" "$pid" 2>/dev/null
    done
}
stopping=0
# installed before any process starts, so a signal never finds the default (die, orphaning them)
trap 'stopping=1; echo "local_multiprocess.sh: stopping (SIGTERM: checkpoint and exit)" >&2; stop_all TERM' INT TERM
for ((i = 0; i < n; i++)); do
    JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" LLMCXR_COORDINATOR="localhost:$port" LLMCXR_NUM_PROCESSES=$n \
        LLMCXR_PROCESS_ID=$i "$bin" train "$@" >"$log_dir/process_$i.log" 2>&1 &
    pids+=($!)
done
echo "local_multiprocess.sh: $n processes x $devices CPU devices, coordinator localhost:$port, logs in $log_dir/"

status=0
failed_at=
live=("${pids[@]}")
while [ ${#live[@]} -gt 0 ]; do
    wait -n  # a process exited, or a trapped signal arrived
    still=()
    for idx in "${!pids[@]}"; do
        pid=${pids[idx]}
        [[ " ${live[*]} " == *" $pid "* ]] || continue
        if kill -0 "$pid" 2>/dev/null; then
            still+=("$pid")
            continue
        fi
        wait "$pid"
        rc=$?
        if [ $rc -ne 0 ] && [ $status -eq 0 ]; then
            status=$rc
            echo "local_multiprocess.sh: process $idx exited $rc; see $log_dir/process_$idx.log" >&2
            tail -n 3 "$log_dir/process_$idx.log" >&2
            if [ $stopping -eq 0 ]; then
                stopping=1
                failed_at=$SECONDS
                stop_all TERM
            fi
        fi
    done
    live=("${still[@]}")
    if [ -n "$failed_at" ] && [ ${#live[@]} -gt 0 ] && [ $((SECONDS - failed_at)) -ge "$grace" ]; then
        stop_all KILL  # a process blocked in a collective with a dead peer never sees SIGTERM
    fi
    if [ $stopping -eq 1 ] && [ ${#live[@]} -gt 0 ]; then
        # while stopping, wake `wait -n` at least once a second: to check the grace period, and
        # because a process that exits while the trap runs may never wake a later `wait -n`
        sleep 1 &
    fi
done
exit $status
