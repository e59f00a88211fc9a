#!/bin/sh
# Stops one slot (blue or green) of the demo service on this local fleet host. Exits 0
# when the slot was not running.
@SLOT_COMMON@
if [ -s "$pidfile" ] && ours "$(cat "$pidfile")"; then
    stop_slot
else
    rm -f "$pidfile"
    echo "$slot was not running"
fi
