#!/usr/bin/env bash
# Starts NUM_PROCESSES CPU processes of one run on this machine, joined like the hosts of a multi-host job
# (coordinator on 127.0.0.1:PORT, process 0 writes the logs and outputs): exercises the multi-process code paths
# without a cluster.
#
# Variables:
#   CONFIG               config to run, e.g. configs/fewshot.py:smoke                            (required)
#   WORKDIR              the run's work directory, the same for every process; relative paths are
#                        taken from the current directory                                         (required)
#   NUM_PROCESSES        processes to start                                                       (default: 2)
#   DEVICES_PER_PROCESS  virtual CPU devices per process: sets --xla_force_host_platform_device_count
#                        in XLA_FLAGS, replacing any such flag already there                       (default: 1)
#   PORT                 coordinator port on 127.0.0.1                                    (default: a free one)
#   PYTHON               interpreter with exvo_jax installed                                       (default: python)
#   KILL_AFTER           seconds the processes have to exit after a SIGTERM/SIGINT to this script (to save a
#                        checkpoint) before they get SIGKILL                                      (default: 120)
#   FAILURE_KILL_AFTER   the same after one process failed (the others may be stuck in a collective) (default: 10)
#   Extra arguments go to every process, e.g. --config.num_epochs=1
#
# Process i runs
#   JAX_PLATFORMS=cpu $PYTHON -m exvo_jax.main --config=$CONFIG --workdir=$WORKDIR \
#     --coordinator_address=127.0.0.1:$PORT --num_processes=$NUM_PROCESSES --process_id=i "$@"
# and writes to $WORKDIR/logs/process_i.log (started afresh on every launch); process 0's log is also shown here.
#
# Exit status: 0 only when every process exits 0. When one fails, the others get SIGTERM (SIGKILL
# FAILURE_KILL_AFTER seconds later), the end of the failing process's log is printed, and the script exits with
# that process's status.
# SIGTERM or SIGINT (Ctrl-C) to this script sends SIGTERM to every process (each saves a checkpoint and exits 0;
# SIGINT is not forwarded as such, since background processes of a script ignore it), then the script waits for
# them; a second SIGINT sends SIGKILL. Rerunning the same command resumes from WORKDIR.
set -euo pipefail

die() {
  echo "local.sh: $*" >&2
  exit 2
}

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  die "needs bash >= 5.1 (wait -n -p); this is $BASH_VERSION"
fi
[ -n "${CONFIG:-}" ] || die "set CONFIG, e.g. CONFIG=configs/fewshot.py:smoke"
[ -n "${WORKDIR:-}" ] || die "set WORKDIR to the run's work directory"
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}
KILL_AFTER=${KILL_AFTER:-120}
FAILURE_KILL_AFTER=${FAILURE_KILL_AFTER:-10}
PYTHON=${PYTHON:-python}
[[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES=$NUM_PROCESSES is not a positive integer"
[[ $DEVICES_PER_PROCESS =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS=$DEVICES_PER_PROCESS is not a positive integer"
[[ $KILL_AFTER =~ ^[0-9]+$ ]] || die "KILL_AFTER=$KILL_AFTER is not a number of seconds"
[[ $FAILURE_KILL_AFTER =~ ^[0-9]+$ ]] || die "FAILURE_KILL_AFTER=$FAILURE_KILL_AFTER is not a number of seconds"
command -v "$PYTHON" > /dev/null || die "PYTHON=$PYTHON not found; set PYTHON to an interpreter with exvo_jax"

# WORKDIR (and CONFIG, when its file is there) are taken from the caller's directory; then run from the repository
# root, where `configs` and `exvo_jax` import.
[[ $WORKDIR = /* || $WORKDIR = *://* ]] || WORKDIR="$PWD/$WORKDIR"
config_file=${CONFIG%%:*}
if [[ $config_file != /* && -f $config_file ]]; then
  CONFIG="$PWD/$CONFIG"
  config_file="$PWD/$config_file"
fi
cd "$(dirname "$0")/.."
[ -f "$config_file" ] || die "config file $config_file not found (CONFIG=$CONFIG)"
case $PYTHON in */*) [[ $PYTHON = /* ]] || PYTHON="$OLDPWD/$PYTHON" ;; esac  # a relative path still works after cd

pick_port() {  # a free TCP port on 127.0.0.1, from whichever interpreter answers
  local py port
  for py in "$PYTHON" python3 python; do
    port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' \
      2> /dev/null) || continue
    if [[ $port =~ ^[0-9]+$ ]]; then
      echo "$port"
      return 0
    fi
  done
  return 1
}
if [ -z "${PORT:-}" ]; then
  PORT=$(pick_port) || die "could not pick a free port with $PYTHON; set PORT"
fi
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
  die "PORT=$PORT is not a TCP port"
fi

# XLA_FLAGS with our device count in place of any --xla_force_host_platform_device_count already there.
xla_flags=()
read -ra current_flags <<< "${XLA_FLAGS:-}"
for flag in "${current_flags[@]}"; do
  [[ $flag = --xla_force_host_platform_device_count=* ]] || xla_flags+=("$flag")
done
xla_flags+=("--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
export XLA_FLAGS="${xla_flags[*]}"
export JAX_PLATFORMS=cpu

logdir="$WORKDIR/logs"
mkdir -p "$logdir" || die "cannot create $logdir"

pids=()           # pids[i]: process i, while it runs
declare -A index  # pid -> i
statuses=()       # statuses[i]: exit status of process i
timer=""          # pid of the SIGTERM -> SIGKILL timer, while it runs
grace=""          # its seconds
streamer=""       # pid of the tail that shows process 0's log
stopping=""       # why the processes were told to stop
first_failed=""

signal_running() {  # signal_running SIG: sends SIG to every process still running
  local pid
  for pid in "${pids[@]}"; do
    if [ -n "$pid" ]; then
      kill "-$1" "$pid" 2> /dev/null || true
    fi
  done
}

stop_all() {  # stop_all REASON SECONDS: SIGTERM to every process, SIGKILL to those left after SECONDS
  [ -z "$stopping" ] || return 0
  stopping=$1
  grace=$2
  echo "local.sh: $stopping: sending SIGTERM to the running processes (SIGKILL in ${grace}s)" >&2
  signal_running TERM
  # The timer ignores the signals a test may send to the whole process group, so only its expiry ends it.
  (trap '' TERM INT HUP && exec sleep "$grace") &
  timer=$!
}

on_signal() {
  if [ -n "$stopping" ]; then
    if [ "$1" = INT ]; then
      echo "local.sh: second SIGINT: sending SIGKILL" >&2
      signal_running KILL
    else
      signal_running TERM  # repeated SIGTERM: pass it on once more, the processes decide what it means
    fi
    return 0
  fi
  stop_all "got SIG$1" "$KILL_AFTER"
}

cleanup() {  # on any exit: nothing is left running
  trap - TERM INT HUP
  signal_running KILL
  { [ -z "$timer" ] || kill -KILL "$timer"; } 2> /dev/null || true
  { [ -z "$streamer" ] || kill -KILL "$streamer"; } 2> /dev/null || true
  wait 2> /dev/null || true
}
trap cleanup EXIT
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

echo "local.sh: $NUM_PROCESSES processes of $CONFIG, coordinator 127.0.0.1:$PORT, workdir $WORKDIR, logs in $logdir"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  [ -z "$stopping" ] || break  # signalled while starting: start no more
  log="$logdir/process_$i.log"
  : > "$log"
  "$PYTHON" -m exvo_jax.main --config="$CONFIG" --workdir="$WORKDIR" --coordinator_address="127.0.0.1:$PORT" \
    --num_processes="$NUM_PROCESSES" --process_id="$i" "$@" > "$log" 2>&1 < /dev/null &
  pids[i]=$!
  index[$!]=$i
done
# Shows process 0's log until it exits; ignores group-wide signals so its last lines (the checkpoint message) show.
(trap '' TERM INT HUP && exec tail -n +1 -s 0.2 -f --pid="${pids[0]}" "$logdir/process_0.log") &
streamer=$!

running=${#index[@]}
while ((running > 0)); do
  waitset=()
  for pid in "${pids[@]}"; do
    [ -z "$pid" ] || waitset+=("$pid")
  done
  [ -z "$timer" ] || waitset+=("$timer")
  finished=""
  wait -n -p finished "${waitset[@]}" && status=0 || status=$?
  if [ -z "${finished:-}" ]; then
    ((status > 128)) && continue  # a trapped signal interrupted the wait; the trap has run
    echo "local.sh: lost track of the processes (wait returned $status)" >&2
    for i in "${!pids[@]}"; do
      [ -z "${pids[i]}" ] || statuses[i]=$status
    done
    break
  fi
  if [ "$finished" = "$timer" ]; then
    timer=""
    echo "local.sh: processes still running ${grace}s after SIGTERM: sending SIGKILL" >&2
    signal_running KILL
    continue
  fi
  i=${index[$finished]}
  pids[i]=""
  statuses[i]=$status
  running=$((running - 1))
  if ((status != 0)); then
    echo "local.sh: process $i exited with status $status" >&2
    [ -n "$first_failed" ] || first_failed=$i
    stop_all "process $i failed" "$FAILURE_KILL_AFTER"
  fi
done
# Let the log stream catch up with process 0's last lines (tail exits by itself once process 0 is gone).
wait "$streamer" 2> /dev/null || true
streamer=""
if [ -n "$timer" ]; then
  { kill -KILL "$timer" && wait "$timer"; } 2> /dev/null || true
  timer=""
fi

if [ -z "$first_failed" ]; then
  for i in "${!statuses[@]}"; do
    if [ "${statuses[i]}" != 0 ]; then
      first_failed=$i
      break
    fi
  done
fi
if [ -n "$first_failed" ]; then
  summary=""
  for i in "${!statuses[@]}"; do
    summary+=" $i:${statuses[i]}"
  done
  echo "local.sh: FAILED (exit status per process:$summary); last lines of $logdir/process_$first_failed.log:" >&2
  tail -n 20 "$logdir/process_$first_failed.log" | sed 's/^/  | /' >&2
  status=${statuses[first_failed]}
  ((status > 0 && status < 256)) || status=1
  exit "$status"
fi
if [ -n "$stopping" ]; then
  echo "local.sh: stopped ($stopping); every process exited cleanly. Rerun the same command to resume from $WORKDIR"
else
  echo "local.sh: all $NUM_PROCESSES processes finished"
fi
