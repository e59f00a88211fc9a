#!/bin/sh
# Restarts one slot (blue or green) of the demo service on this local fleet host from its
# current-<slot> link, on the slot's port. It must return at once: the JVM is detached
# from the SSH channel (own session, no inherited stdin/stdout), or the channel would
# stay open for as long as the JVM runs.
@SLOT_COMMON@
java=@JAVA@
address=@ADDRESS@

# Refused before the running slot is touched: nothing was ever deployed to this slot.
if [ ! -f "$jar" ]; then
    echo "$jar does not exist: point shop/current-$slot at a release first" >&2
    exit 1
fi
stop_slot || exit 1

echo "$(date -u +%FT%TZ) [$slot] starting $(readlink "shop/current-$slot") on port $port" >>"$log"
setsid nohup "$java" -Xmx64m -Xss512k -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData \
    -Dserver.address="$address" -Dserver.port="$port" -Dsun.net.httpserver.nodelay=true \
    -jar "$jar" </dev/null >>"$log" 2>&1 &
echo $! >"$pidfile"
echo "started $slot pid $!"
