#!/usr/bin/env bash
# Runs every (model, task) cell of Table 7 of the HUME-VB datasets paper (A-VB 2022: the feature MLP and End2You's
# Emo18 on High, Two, Culture and Type) and prints the table: a row per model with dev (our Val) and test columns
# per task, beside the organisers' published test scores. Test columns stay '-' while the Test labels are hidden
# (-1); submit the A-VB-<Task>_<team>_<n>.csv files of each workdir to score them.
#
# Variables (all optional):
#   WORKDIR  folder for the cells' workdirs and logs         (default: runs/avb_table7)
#   CELLS    space-separated config variants                 (default: get_sweep() of configs/avb.py)
#   PYTHON   interpreter                                     (default: python)
#   Extra arguments are passed to every run, e.g. --config.data.root=/data/a_vb --config.num_seeds=3
#
# A cell that fails is reported, the sweep goes on, and the script exits 1 after printing the table; finished cells
# are not retrained (each resumes from its workdir).
set -euo pipefail
cd "$(dirname "$0")/.."

WORKDIR=${WORKDIR:-runs/avb_table7}
PYTHON=${PYTHON:-python}
if ! command -v "$PYTHON" > /dev/null; then
  echo "avb_table7.sh: PYTHON=$PYTHON not found; set PYTHON to the interpreter with exvo_jax installed" >&2
  exit 2
fi
if [ -z "${CELLS+x}" ]; then
  CELLS=$("$PYTHON" -c "from configs import avb; print(' '.join(avb.get_sweep()))")
fi
mkdir -p "$WORKDIR"

workdirs=()
failed=0
for cell in $CELLS; do
  dir="$WORKDIR/${cell//[=,+]/_}"
  workdirs+=("$dir")
  echo "== $cell -> $dir"
  if ! "$PYTHON" -m exvo_jax.main --config="configs/avb.py:$cell" --workdir="$dir" "$@" > "$dir.log" 2>&1; then
    echo "   failed: last lines of $dir.log:"
    tail -n 3 "$dir.log" | sed 's/^/   /'
    failed=$((failed + 1))
  fi
done

"$PYTHON" -m exvo_jax.tasks.avb "${workdirs[@]}"
if [ "$failed" -gt 0 ]; then
  echo "avb_table7.sh: $failed cell(s) failed (see their logs)" >&2
  exit 1
fi
