#!/usr/bin/env bash
# Runs every row of an ablation sweep, one after the other: each entry of get_sweep() in configs/$TASK.py is a
# config variant (the `:arg` string), run as `--config=configs/$TASK.py:<row>` in its own workdir.
#
# Variables:
#   TASK     config module with a get_sweep(): multitask, fewshot, generate, ...                        (required)
#   WORKDIR  folder for the rows' workdirs (WORKDIR/<row>) and logs (WORKDIR/<row>.log)   (default: runs/sweep_$TASK)
#   ROWS     space-separated rows to run instead, "default" = the config's defaults     (default: get_sweep())
#   PYTHON   interpreter with exvo_jax installed                                                  (default: python)
#   Extra arguments go to every row, e.g. --config.data.root=/data/hume_vb
#
# A row's workdir is its variant with every character other than letters, digits, '.', '_' and '-' replaced by '_'
# (hidden=64,adaptation=maml -> hidden_64_adaptation_maml); the empty variant is "default". A failed row is reported
# (the end of its log) and the sweep goes on; the script exits 1 if any row failed. Rerunning resumes every row
# from its workdir, so finished rows are not retrained. Each row's results are in WORKDIR/<row>/ (metrics.json).
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "sweep.sh: $*" >&2
  exit 2
}

[ -n "${TASK:-}" ] || die "set TASK to a config with a get_sweep(), e.g. TASK=fewshot (configs/fewshot.py)"
[[ $TASK =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "TASK=$TASK is not a config module name (configs/<name>.py)"
[ -f "configs/$TASK.py" ] || die "configs/$TASK.py not found (TASK=$TASK)"
WORKDIR=${WORKDIR:-runs/sweep_$TASK}
PYTHON=${PYTHON:-python}
command -v "$PYTHON" > /dev/null || die "PYTHON=$PYTHON not found; set PYTHON to an interpreter with exvo_jax"

rows=()
if [ -n "${ROWS+x}" ]; then
  read -ra rows <<< "$ROWS"
else
  # One row per line, so that the empty variant (the defaults) survives as "default".
  listing=$("$PYTHON" -c "from configs import $TASK as c; print('\n'.join(r or 'default' for r in c.get_sweep()))") \
    || die "could not read get_sweep() from configs/$TASK.py (see the error above)"
  mapfile -t rows <<< "$listing"
fi
if [ "${#rows[@]}" = 0 ] || [ -z "${rows[0]}" ]; then
  die "no rows to run (ROWS, or get_sweep() of configs/$TASK.py, is empty)"
fi
mkdir -p "$WORKDIR"

failed=()
for row in "${rows[@]}"; do
  variant=$row
  [ "$row" = default ] && variant=""
  name=${row//[^A-Za-z0-9._-]/_}
  dir="$WORKDIR/$name"
  echo "== ${row} -> $dir"
  if "$PYTHON" -m exvo_jax.main --config="configs/$TASK.py:$variant" --workdir="$dir" "$@" > "$dir.log" 2>&1; then
    echo "   done"
  else
    status=$?
    failed+=("$row")
    echo "   failed (status $status): last lines of $dir.log:"
    tail -n 5 "$dir.log" | sed 's/^/   | /'
  fi
done

echo "sweep.sh: $((${#rows[@]} - ${#failed[@]})) of ${#rows[@]} rows of configs/$TASK.py done, results under $WORKDIR"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "sweep.sh: failed rows: ${failed[*]}" >&2
  exit 1
fi
