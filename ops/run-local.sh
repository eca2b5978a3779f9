#!/usr/bin/env bash
# Run the whole stack on this machine without containers: migrate the database, then start every process
# of a Procfile (ops/Procfile by default) with its output in LOG_DIR/NAME.log. Ctrl-C (or SIGTERM) stops
# them all; if one of them exits, the others are stopped too.
#
#   ops/run-local.sh                  # settings from ROUTET2I_* variables, e.g. ROUTET2I_DATABASE_URL
#   LOG_DIR=/tmp/rt2i ops/run-local.sh my.Procfile
#
# Needs `routet2i` on PATH (pip install -e . in a virtualenv), Redis and the database reachable.
set -euo pipefail

procfile="${1:-$(dirname "$0")/Procfile}"
log_dir="${LOG_DIR:-var/log}"
mkdir -p "$log_dir"

routet2i db upgrade

pids=()
stop_all() {
    trap - INT TERM EXIT
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
}
trap stop_all EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

while IFS= read -r line || [[ -n "$line" ]]; do
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    name="${line%%:*}"
    command="${line#*:}"
    echo "starting $name:$command  (log: $log_dir/$name.log)"
    bash -c "exec $command" >"$log_dir/$name.log" 2>&1 &
    pids+=("$!")
done <"$procfile"

# Block until any process exits; the EXIT trap then stops the others.
set +e
wait -n
status=$?
echo "a process exited with status $status; stopping the others" >&2
exit "$status"
