#!/usr/bin/env python3
"""A light stand-in for the demo JVM service, for fleets of a hundred hosts on one machine.

Same contract as fleet/java/DemoApp.java: it reads version, behaviour and start-up delay from
roller-demo.properties inside the jar it is given, serves /actuator/health (503 until the
start-up delay has passed), /version, /stats and / (GET and POST), and on SIGTERM stops
accepting, lets in-flight requests finish (up to 10 s) and exits.

Usage: light-app.py ADDRESS PORT JAR
"""

import signal
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SHUTDOWN_GRACE_S = 10.0


def log(message):
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{stamp} [light-app] {message}", flush=True)


def properties(jar):
    with zipfile.ZipFile(jar) as z:
        text = z.read("roller-demo.properties").decode()
    props = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


address, port, jar = sys.argv[1], int(sys.argv[2]), sys.argv[3]
props = properties(jar)
VERSION = props.get("version", "unknown")
BEHAVIOUR = props.get("behaviour", "healthy")
STARTUP_DELAY_S = int(props.get("startup_delay_ms", "0")) / 1000
ERROR_PERCENT = int(props.get("error_percent", "0"))
STARTED = time.monotonic()

counter_lock = threading.Lock()
in_flight = 0
root_requests = 0


def should_fail():
    # Spreads failures evenly, as the JVM service does.
    global root_requests
    with counter_lock:
        n = root_requests
        root_requests += 1
    return (n + 1) * ERROR_PERCENT // 100 > n * ERROR_PERCENT // 100


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # nginx keeps upstream connections alive; Nagle would hold small responses back.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def respond(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "text/plain")
        self.send_header("X-App-Version", VERSION)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def counted(self, handler):
        global in_flight
        with counter_lock:
            in_flight += 1
        try:
            handler()
        finally:
            with counter_lock:
                in_flight -= 1

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def route(self):
        path = self.path.split("?", 1)[0]
        if path == "/actuator/health":
            up = BEHAVIOUR != "never-healthy" and time.monotonic() - STARTED >= STARTUP_DELAY_S
            self.respond(200 if up else 503, '{"status":"UP"}' if up else '{"status":"DOWN"}')
        elif path == "/version":
            self.respond(200, VERSION + "\n")
        elif path == "/stats":
            self.respond(200, f"in_flight={in_flight - 1}\nversion={VERSION}\n")
        else:
            received = self.body()
            if BEHAVIOUR == "errors" and should_fail():
                self.respond(500, f"error injected by version {VERSION}\n")
            elif self.command == "POST":
                self.respond(200, f"version {VERSION} received {len(received)} bytes\n")
            else:
                self.respond(200, f"hello from version {VERSION}\n")

    def do_GET(self):
        self.counted(self.route)

    do_HEAD = do_GET
    do_POST = do_GET


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def main():
    server = Server((address, port), Handler)
    log(f"version {VERSION} ({BEHAVIOUR}) listening on {address}:{port}")
    if BEHAVIOUR == "crash":
        time.sleep(0.3)
        log("crashing on purpose (behaviour=crash)")
        sys.exit(1)

    def on_sigterm(_signum, _frame):
        log(f"SIGTERM: no longer accepting, {in_flight} request(s) in flight")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    while in_flight > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    log(f"stopped with {in_flight} request(s) still in flight")


main()
