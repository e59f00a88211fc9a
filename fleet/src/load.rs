//! Steady client traffic through the load balancer, counting every failed request.
//!
//! "Zero downtime" is only proven if requests keep flowing during the whole rollout and not a
//! single one fails. Each request opens its own connection, so a backend that is stopped,
//! restarted or not yet listening is hit by new connections all the time, as with real clients.
//! The generator always stops by itself (duration and request caps) so a test that forgets it
//! cannot spin forever.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::http;

/// How many failure descriptions a report keeps; the counters cover the rest.
pub const MAX_FAILURES_KEPT: usize = 50;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub clients: usize,
    /// Between two requests of one client; keeps a 2-core machine responsive for the JVMs.
    pub pause: Duration,
    /// Per request, connect to last byte. A request slower than this counts as failed.
    pub request_timeout: Duration,
    /// Safety net: clients stop by themselves after this long...
    pub max_duration: Duration,
    /// ...or after this many requests each.
    pub max_requests_per_client: u64,
    /// Share of requests that are POSTs, spread evenly over each client's requests; POSTs are
    /// what nginx does not retry on another server, so a request sent to a stopped host fails.
    pub post_percent: u64,
}

impl LoadOptions {
    pub fn new(clients: usize) -> Self {
        LoadOptions {
            clients,
            pause: Duration::from_millis(5),
            request_timeout: Duration::from_secs(10),
            max_duration: Duration::from_secs(600),
            max_requests_per_client: 200_000,
            post_percent: 50,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    /// The first [`MAX_FAILURES_KEPT`] failures: time since start, request and reason.
    pub failures: Vec<String>,
    /// Successful responses per `X-App-Version` (`"(none)"` when the header was missing).
    pub versions: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    failures: Vec<String>,
    versions: BTreeMap<String, u64>,
}

struct Shared {
    stop: AtomicBool,
    tally: Mutex<Tally>,
    progress: Condvar,
    started: Instant,
}

impl Shared {
    fn report(&self) -> LoadReport {
        let t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        LoadReport {
            ok: t.ok,
            failed: t.failed,
            failures: t.failures.clone(),
            versions: t.versions.clone(),
            elapsed: self.started.elapsed(),
        }
    }
}

/// A running load generator; stopped on drop.
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// `clients` threads looping GET / and POST / against `url` (e.g. the fleet's `lb_url()`).
    pub fn start(url: &str, clients: usize) -> Load {
        Load::start_with(url, LoadOptions::new(clients))
    }

    /// Panics on a URL that is not `http://host:port[/path]`: that is a bug in the caller.
    pub fn start_with(url: &str, options: LoadOptions) -> Load {
        let (authority, path) = http::split_url(url).expect("load generator URL");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            tally: Mutex::new(Tally::default()),
            progress: Condvar::new(),
            started: Instant::now(),
        });
        let threads = (0..options.clients.max(1))
            .map(|client| {
                let shared = Arc::clone(&shared);
                let (authority, path, options) = (authority.clone(), path.clone(), options.clone());
                std::thread::Builder::new()
                    .name(format!("load-{client}"))
                    .spawn(move || run_client(client, &shared, &authority, &path, &options))
                    .expect("spawning a load client thread")
            })
            .collect();
        Load { shared, threads }
    }

    /// Waits until at least `n` requests succeeded; false if `timeout` passed first.
    pub fn wait_for_requests(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut tally = self.shared.tally.lock().unwrap_or_else(|e| e.into_inner());
        while tally.ok < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            tally = self
                .shared
                .progress
                .wait_timeout(tally, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// The counts so far, without stopping.
    pub fn snapshot(&self) -> LoadReport {
        self.shared.report()
    }

    /// Stops every client (each finishes its current request, bounded by the request timeout)
    /// and returns the final counts.
    pub fn stop(mut self) -> LoadReport {
        self.halt();
        self.shared.report()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run_client(client: usize, shared: &Shared, authority: &str, path: &str, options: &LoadOptions) {
    for n in 0..options.max_requests_per_client {
        if shared.stop.load(Ordering::SeqCst) || shared.started.elapsed() > options.max_duration {
            return;
        }
        // Request n is a POST when it carries the running count of POSTs past a whole number.
        let posts = |n: u64| n * options.post_percent.min(100) / 100;
        let (method, body) = if posts(n + 1) == posts(n) {
            ("GET", None)
        } else {
            (
                "POST",
                Some(format!("client {client} request {n}\n").into_bytes()),
            )
        };
        let at = shared.started.elapsed();
        let outcome = http::request(
            authority,
            method,
            path,
            body.as_deref(),
            options.request_timeout,
        );
        {
            let mut t = shared.tally.lock().unwrap_or_else(|e| e.into_inner());
            match outcome {
                Ok(r) if (200..300).contains(&r.status) => {
                    t.ok += 1;
                    let version = r.header("X-App-Version").unwrap_or("(none)").to_string();
                    *t.versions.entry(version).or_default() += 1;
                }
                other => {
                    t.failed += 1;
                    if t.failures.len() < MAX_FAILURES_KEPT {
                        let reason = match other {
                            Ok(r) => format!(
                                "status {} (version {}): {}",
                                r.status,
                                r.header("X-App-Version").unwrap_or("-"),
                                r.text().trim().chars().take(200).collect::<String>()
                            ),
                            Err(e) => format!("{e:#}"),
                        };
                        t.failures.push(format!(
                            "+{:.3}s {method} {path}: {reason}",
                            at.as_secs_f64()
                        ));
                    }
                }
            }
        }
        shared.progress.notify_all();
        if !options.pause.is_zero() {
            std::thread::sleep(options.pause);
        }
    }
}
