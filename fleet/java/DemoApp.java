// A stand-in for a Spring Boot service jar: same property names, same health endpoint, and the
// failure modes roller must survive (slow start, never healthy, crash on start, 5xx responses).
// JDK only, so the fleet needs nothing but a JDK to build and run it.

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;

public final class DemoApp {
    private static final long SHUTDOWN_GRACE_MS = 10_000;
    private static final long MAX_SLOW_MS = 120_000;

    private final String version;
    private final String behaviour;
    private final long startupDelayMs;
    private final int errorPercent;
    private final long startedAt = System.nanoTime();
    private final AtomicLong rootRequests = new AtomicLong();
    // Counted by hand because JDK 17's HttpServer.stop(n) waits the full n seconds even when idle
    // (JDK-8304065): the shutdown hook watches this instead and exits as soon as it reaches zero.
    private final AtomicInteger inFlight = new AtomicInteger();

    private DemoApp(Properties props) {
        version = props.getProperty("version", "unknown");
        behaviour = props.getProperty("behaviour", "healthy");
        startupDelayMs = Long.parseLong(props.getProperty("startup_delay_ms", "1000"));
        errorPercent = Integer.parseInt(props.getProperty("error_percent", "0"));
    }

    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        try (InputStream in = DemoApp.class.getResourceAsStream("/roller-demo.properties")) {
            if (in != null) {
                props.load(in);
            }
        }
        new DemoApp(props).run();
    }

    private void run() throws Exception {
        String address = System.getProperty("server.address", "127.0.0.1");
        int port = Integer.getInteger("server.port", 8080);

        HttpServer server = HttpServer.create(new InetSocketAddress(address, port), 256);
        ExecutorService pool = Executors.newFixedThreadPool(64);
        server.setExecutor(pool);
        server.createContext("/actuator/health", ex -> handle(ex, this::health));
        server.createContext("/version", ex -> handle(ex, e -> respond(e, 200, version + "\n")));
        server.createContext("/slow", ex -> handle(ex, this::slow));
        // Lets a test see that a request really is in flight before it signals the process.
        server.createContext("/stats", ex -> handle(ex, e -> respond(e, 200,
                "in_flight=" + (inFlight.get() - 1) + "\nversion=" + version + "\n")));
        server.createContext("/", ex -> handle(ex, this::root));
        server.start();
        InetSocketAddress bound = server.getAddress();
        log("version " + version + " (" + behaviour + ") listening on "
                + bound.getAddress().getHostAddress() + ":" + bound.getPort());

        Runtime.getRuntime().addShutdownHook(new Thread(() -> shutdown(server, pool), "graceful-shutdown"));

        if (behaviour.equals("crash")) {
            // Let the process be seen starting (pid written, port bound) before it dies, as a
            // Spring context failing late in startup would.
            Thread.sleep(300);
            log("crashing on purpose (behaviour=crash)");
            Runtime.getRuntime().halt(1);
        }
    }

    private void shutdown(HttpServer server, ExecutorService pool) {
        log("SIGTERM: no longer accepting, " + inFlight.get() + " request(s) in flight");
        // stop() closes the listening socket at once, then blocks; run it aside and watch the
        // in-flight count ourselves (see inFlight).
        Thread stopper = new Thread(() -> server.stop((int) (SHUTDOWN_GRACE_MS / 1000)), "http-stop");
        stopper.setDaemon(true);
        stopper.start();
        long deadline = System.currentTimeMillis() + SHUTDOWN_GRACE_MS;
        while (inFlight.get() > 0 && System.currentTimeMillis() < deadline) {
            sleep(20);
        }
        pool.shutdown();
        try {
            pool.awaitTermination(Math.max(1, deadline - System.currentTimeMillis()), TimeUnit.MILLISECONDS);
        } catch (InterruptedException ignored) {
            Thread.currentThread().interrupt();
        }
        log("stopped with " + inFlight.get() + " request(s) still in flight");
    }

    private interface Handler {
        void handle(HttpExchange exchange) throws IOException;
    }

    private void handle(HttpExchange exchange, Handler handler) throws IOException {
        inFlight.incrementAndGet();
        try {
            exchange.getResponseHeaders().set("X-App-Version", version);
            handler.handle(exchange);
        } catch (IOException | RuntimeException e) {
            log("request failed: " + e);
            throw e;
        } finally {
            exchange.close();
            inFlight.decrementAndGet();
        }
    }

    private void health(HttpExchange ex) throws IOException {
        boolean started = elapsedMs() >= startupDelayMs;
        if (behaviour.equals("never-healthy") || !started) {
            respond(ex, 503, "{\"status\":\"DOWN\"}");
        } else {
            respond(ex, 200, "{\"status\":\"UP\"}");
        }
    }

    private void root(HttpExchange ex) throws IOException {
        String method = ex.getRequestMethod();
        byte[] body = readAll(ex.getRequestBody());
        if (behaviour.equals("errors") && shouldFail()) {
            respond(ex, 500, "error injected by version " + version + "\n");
            return;
        }
        if (method.equals("POST")) {
            respond(ex, 200, "version " + version + " received " + body.length + " bytes\n");
        } else if (method.equals("GET") || method.equals("HEAD")) {
            respond(ex, 200, "hello from version " + version + "\n");
        } else {
            respond(ex, 405, "method not allowed\n");
        }
    }

    // Spreads failures evenly (n-th request fails when floor(n*p/100) steps up), so a short test
    // sees the configured share instead of a random burst.
    private boolean shouldFail() {
        long n = rootRequests.getAndIncrement();
        return (n + 1) * errorPercent / 100 > n * errorPercent / 100;
    }

    private void slow(HttpExchange ex) throws IOException {
        long ms = 1000;
        String query = ex.getRequestURI().getQuery();
        if (query != null) {
            for (String pair : query.split("&")) {
                if (pair.startsWith("ms=")) {
                    try {
                        ms = Long.parseLong(pair.substring(3));
                    } catch (NumberFormatException e) {
                        respond(ex, 400, "bad ms\n");
                        return;
                    }
                }
            }
        }
        sleep(Math.max(0, Math.min(ms, MAX_SLOW_MS)));
        respond(ex, 200, "version " + version + " slept " + ms + " ms\n");
    }

    private long elapsedMs() {
        return TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - startedAt);
    }

    private static void respond(HttpExchange ex, int status, String body) throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        boolean head = ex.getRequestMethod().equals("HEAD");
        ex.getResponseHeaders().set("Content-Type", "text/plain; charset=utf-8");
        ex.sendResponseHeaders(status, head ? -1 : bytes.length);
        if (!head) {
            try (OutputStream out = ex.getResponseBody()) {
                out.write(bytes);
            }
        }
    }

    private static byte[] readAll(InputStream in) throws IOException {
        ByteArrayOutputStream buf = new ByteArrayOutputStream();
        in.transferTo(buf);
        return buf.toByteArray();
    }

    private static void sleep(long ms) {
        try {
            Thread.sleep(ms);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    private static void log(String message) {
        System.out.println(java.time.Instant.now() + " [DemoApp] " + message);
        System.out.flush();
    }
}
