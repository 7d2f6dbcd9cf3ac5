#!/usr/bin/env bash
# Runs one config on every worker of a Cloud TPU VM pod (or a single TPU VM) at once, through
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command=...
# Each worker runs `python -m exvo_jax.main --config=$CONFIG --workdir=$WORKDIR "$@"` in REPO_DIR. No coordinator
# flags are passed: on a TPU VM jax.distributed.initialize() finds the coordinator, the process count and each
# worker's id from the TPU runtime by itself.
#
# Variables:
#   TPU_NAME   name of the TPU VM (pod slice)                                                      (required)
#   ZONE       its zone, e.g. us-central2-b                                                         (required)
#   PROJECT    Google Cloud project                                         (default: gcloud's configured one)
#   CONFIG     config to run, e.g. configs/fewshot.py:hidden=256                                    (required)
#   WORKDIR    the run's work directory, the SAME absolute path on every worker, on a filesystem every
#              worker mounts (Filestore/NFS, a gcsfuse-mounted bucket); a path local to each VM would give
#              each worker its own, diverging copy. gs:// URLs are refused: the JSON/CSV/PNG/wav outputs
#              use plain file I/O                                                             (required)
#   REPO_DIR   the repository on the workers; ~ is the worker's home                   (default: ~/exvo_jax)
#   SYNC=1     first copy this checkout (tracked and untracked, not ignored, files) to REPO_DIR on every
#              worker                                                                          (default: 0)
#   SETUP=1    first install the repository on every worker: pip install -e . "$TPU_JAX"      (default: 0)
#   TPU_JAX    pip requirement that brings JAX's TPU runtime (libtpu), installed by SETUP=1; empty to skip
#                                                                                        (default: jax[tpu])
#   PYTHON     interpreter on the workers                                                 (default: python3)
#   REMOTE_ENV space-separated NAME=VALUE pairs (no spaces in values) set for the run on every worker, e.g.
#              "EXVO_DATA=/mnt/hume_vb EXVO_CACHE=/mnt/cache"                                    (default: none)
#   Extra arguments go to every worker's run, e.g. --config.num_epochs=30
#
# Example (fresh pod: copy the code, install, run):
#   SYNC=1 SETUP=1 TPU_NAME=exvo-v4-32 ZONE=us-central2-b CONFIG=configs/fewshot.py \
#     WORKDIR=/mnt/shared/exvo/fewshot launch/tpu_pod.sh --config.num_epochs=30
#
# Preemption / maintenance: the workers' processes get SIGTERM, save a checkpoint to WORKDIR and exit 0. Rerunning
# the same command (after recreating the TPU if it was deleted, with SYNC=1 SETUP=1 on a fresh one) resumes from
# WORKDIR. Closing the ssh session kills the runs without a checkpoint: start this script inside tmux or screen.
set -euo pipefail

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

command -v gcloud > /dev/null || die "gcloud not found; install the Google Cloud CLI and run 'gcloud auth login'"
[ -n "${TPU_NAME:-}" ] || die "set TPU_NAME to the TPU VM's name"
[ -n "${ZONE:-}" ] || die "set ZONE to the TPU VM's zone, e.g. ZONE=us-central2-b"
[ -n "${CONFIG:-}" ] || die "set CONFIG, e.g. CONFIG=configs/fewshot.py"
[ -n "${WORKDIR:-}" ] || die "set WORKDIR to an absolute path every worker mounts"
REPO_DIR=${REPO_DIR:-"~/exvo_jax"}
SYNC=${SYNC:-0}
SETUP=${SETUP:-0}
TPU_JAX=${TPU_JAX-"jax[tpu]"}
PYTHON=${PYTHON:-python3}
REMOTE_ENV=${REMOTE_ENV:-}
case $WORKDIR in
  *://*) die "WORKDIR=$WORKDIR: URL workdirs (gs://) are refused; mount the bucket (gcsfuse) or use a shared filesystem" ;;
  /*) echo "tpu_pod.sh: note: WORKDIR=$WORKDIR must be the same shared filesystem on every worker" >&2 ;;
  *) die "WORKDIR=$WORKDIR is relative; give an absolute path on a filesystem every worker mounts" ;;
esac
# The workers' command: JAX_PLATFORMS=tpu makes a broken TPU runtime an error rather than a silent run on CPU.
run=(env JAX_PLATFORMS=tpu)
read -ra env_pairs <<< "$REMOTE_ENV"
for pair in "${env_pairs[@]}"; do
  [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "REMOTE_ENV entry '$pair' is not NAME=VALUE (no spaces in values)"
  run+=("$pair")
done
cd "$(dirname "$0")/.."
[ -f "${CONFIG%%:*}" ] || die "config file ${CONFIG%%:*} not found in this checkout (CONFIG=$CONFIG)"

# REPO_DIR quoted for the workers' shell, a leading ~ left to expand there (as "$HOME", kept literal here).
# shellcheck disable=SC2016,SC2088
case $REPO_DIR in
  "~") remote_dir='"$HOME"' ;;
  "~/"*) remote_dir="\"\$HOME\"/$(printf %q "${REPO_DIR#"~/"}")" ;;
  *) remote_dir=$(printf %q "$REPO_DIR") ;;
esac

gcloud_args=(compute tpus tpu-vm)
ssh_args=("$TPU_NAME" "--zone=$ZONE" --worker=all)
if [ -n "${PROJECT:-}" ]; then
  ssh_args+=("--project=$PROJECT")
fi
on_all_workers() {  # on_all_workers COMMAND: runs the shell command on every worker at once
  echo "tpu_pod.sh: on every worker of $TPU_NAME: $1"
  gcloud "${gcloud_args[@]}" ssh "${ssh_args[@]}" --command="$1"
}

if [ "$SYNC" = 1 ]; then
  command -v git > /dev/null || die "SYNC=1 needs git (the files to copy are git's tracked and untracked ones)"
  archive=$(mktemp "${TMPDIR:-/tmp}/exvo_jax_sync.XXXXXX")
  trap 'rm -f "$archive"' EXIT
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$archive"
  remote_archive=exvo_jax_sync.tar.gz  # in each worker's home
  gcloud "${gcloud_args[@]}" scp "$archive" "$TPU_NAME:$remote_archive" "${ssh_args[@]:1}"
  on_all_workers "mkdir -p $remote_dir && tar -xzf ~/$remote_archive -C $remote_dir && rm -f ~/$remote_archive"
fi

if [ "$SETUP" = 1 ]; then
  install="$PYTHON -m pip install -e ."
  [ -z "$TPU_JAX" ] || install+=" $(printf %q "$TPU_JAX")"
  on_all_workers "cd $remote_dir && $install"
fi

run+=("$PYTHON" -m exvo_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
on_all_workers "cd $remote_dir && $(printf '%q ' "${run[@]}")"
