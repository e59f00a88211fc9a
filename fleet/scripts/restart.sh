#!/bin/sh
# Restarts the demo service on this local fleet host. roller runs it over SSH from the host's
# directory, and it must return at once: the JVM is detached from the SSH channel (own session,
# no inherited stdin/stdout), or the channel would stay open for as long as the JVM runs. A
# light fleet runs fleet/light/light-app.py with python3 instead of the JVM, same contract.
set -u
cd "$(dirname "$0")/.." || exit 1
here=$(pwd -P)
runtime=@RUNTIME@
address=@ADDRESS@
port=@PORT@

# app.pid may be stale and its PID reused: only a live, non-zombie process whose working
# directory is this host counts as our app.
ours() {
    [ -r "/proc/$1/stat" ] || return 1
    state=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
    case "$state" in ''|Z|X) return 1 ;; esac
    [ "$(readlink "/proc/$1/cwd" 2>/dev/null)" = "$here" ]
}

if [ -s app.pid ]; then
    old=$(cat app.pid)
    if ours "$old"; then
        echo "$(date -u +%FT%TZ) [restart] stopping pid $old" >>app.log
        kill -TERM "$old" 2>/dev/null
        # The app drains in-flight requests on SIGTERM (up to 10 s); 30 s is the hard limit.
        waited=0
        while ours "$old"; do
            if [ "$waited" -ge 300 ]; then
                echo "$(date -u +%FT%TZ) [restart] pid $old ignored SIGTERM for 30s, killing" >>app.log
                kill -KILL "$old" 2>/dev/null
                killed=0
                while ours "$old" && [ "$killed" -lt 50 ]; do sleep 0.1; killed=$((killed + 1)); done
                break
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
    fi
fi

echo "$(date -u +%FT%TZ) [restart] starting $(readlink shop/current)" >>app.log
@LAUNCH@
echo $! >app.pid
echo "started pid $!"
