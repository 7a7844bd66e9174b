# Shared by the recipes: the drpipe command, the scaled-down mode, one place to log.
#   SMALL=1      a few photos, tiny images, one epoch: checks the whole sequence in minutes
#   DRPIPE=...   the drpipe command [default: drpipe on PATH]
#   OUT=DIR      where the recipe writes its shards and runs [default: recipe-NAME]
#   WORKERS=N    preprocessing workers [default: all cores]
set -euo pipefail
DRPIPE=${DRPIPE:-drpipe}
SMALL=${SMALL:-0}
WORKERS_OPT=()
if [ -n "${WORKERS:-}" ]; then WORKERS_OPT=(--workers "$WORKERS"); fi
step() { printf '\n== %s\n' "$*"; }
run() { printf '+ %s\n' "$*"; "$@"; }
