#!/bin/sh
# Stops the demo service's single JVM on this local fleet host (the one bin/restart starts).
set -u
cd "$(dirname "$0")/.." || exit 1
here=$(pwd -P)

ours() {
    [ -r "/proc/$1/stat" ] || return 1
    state=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
    case "$state" in ''|Z|X) return 1 ;; esac
    [ "$(readlink "/proc/$1/cwd" 2>/dev/null)" = "$here" ]
}

[ -s app.pid ] || exit 0
old=$(cat app.pid)
if ours "$old"; then
    echo "$(date -u +%FT%TZ) [stop] stopping pid $old" >>app.log
    kill -TERM "$old" 2>/dev/null
    waited=0
    while ours "$old" && [ "$waited" -lt 300 ]; do sleep 0.1; waited=$((waited + 1)); done
    ours "$old" && kill -KILL "$old" 2>/dev/null
fi
rm -f app.pid
