# What bin/restart-slot and bin/stop-slot share: argument check, paths, stopping the slot's JVM.
set -u
cd "$(dirname "$0")/.." || exit 1
here=$(pwd -P)
slot=${1:-}
case "$slot" in
    blue) port=@BLUE_PORT@ ;;
    green) port=@GREEN_PORT@ ;;
    *) echo "usage: $0 blue|green (got '$slot')" >&2; exit 2 ;;
esac
pidfile="app-$slot.pid"
log="app-$slot.log"
jar="$here/shop/current-$slot/app.jar"

# The pid file may be stale and its PID reused, and both slots share this working directory:
# only a live, non-zombie process started with this slot's jar path counts as the slot's JVM.
ours() {
    [ -r "/proc/$1/stat" ] || return 1
    state=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
    case "$state" in ''|Z|X) return 1 ;; esac
    tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qxF -- "$jar"
}

# Returns 0 once the slot's JVM is gone (or was not running), 1 if it survived SIGKILL.
stop_slot() {
    [ -s "$pidfile" ] || return 0
    old=$(cat "$pidfile")
    if ours "$old"; then
        echo "$(date -u +%FT%TZ) [$slot] stopping pid $old" >>"$log"
        kill -TERM "$old" 2>/dev/null
        # The app drains in-flight requests on SIGTERM (up to 10 s); 30 s is the hard limit.
        waited=0
        while ours "$old"; do
            if [ "$waited" -ge 300 ]; then
                echo "$(date -u +%FT%TZ) [$slot] pid $old ignored SIGTERM for 30s, killing" >>"$log"
                kill -KILL "$old" 2>/dev/null
                killed=0
                while ours "$old" && [ "$killed" -lt 50 ]; do sleep 0.1; killed=$((killed + 1)); done
                break
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
        if ours "$old"; then
            echo "$slot: pid $old survived SIGKILL" >&2
            return 1
        fi
        echo "stopped $slot pid $old"
    fi
    rm -f "$pidfile"
}
