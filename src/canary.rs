//! Judging a canary from the load balancer's access log: its share of 5xx answers and its
//! upstream time against the other hosts', over one hold.
//!
//! roller reads lines written with this Nginx log format (extra fields after these are
//! ignored):
//!
//! ```nginx
//! log_format roller '$upstream_addr $status $upstream_response_time';
//! ```
//!
//! A request nginx retried on another server lists every server it tried (`a:80, b:80`) and
//! every time (`0.001, 0.004`); the last server is the one whose answer the client got.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::plan::Judgement;

/// Requests one upstream server answered during a hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stats {
    pub requests: u64,
    pub errors: u64,
    /// Sum of upstream response times, in seconds.
    pub seconds: f64,
}

impl Stats {
    fn add(&mut self, other: Stats) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.seconds += other.seconds;
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    pub fn mean_seconds(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.seconds / self.requests as f64
        }
    }
}

/// Per-server statistics of the log lines in `text`. Lines that name no upstream (answered by
/// nginx itself) or do not parse are skipped.
pub fn parse_log(text: &str) -> BTreeMap<String, Stats> {
    let mut by_server: BTreeMap<String, Stats> = BTreeMap::new();
    for line in text.lines() {
        let mut tokens = line.split_whitespace();
        // The server list: tokens ending in ',' (or a lone ':' after an internal redirect)
        // continue it.
        let mut server = None;
        for token in tokens.by_ref() {
            if token == ":" {
                continue;
            }
            let last = token.trim_end_matches(',');
            server = Some(last);
            if !token.ends_with(',') {
                break;
            }
        }
        let Some(server) = server.filter(|s| *s != "-" && !s.is_empty()) else {
            continue;
        };
        let Some(status) = tokens.next().and_then(|s| s.parse::<u16>().ok()) else {
            continue;
        };
        let mut seconds = None;
        for token in tokens.by_ref() {
            if token == ":" {
                continue;
            }
            seconds = token.trim_end_matches(',').parse::<f64>().ok().or(seconds);
            if !token.ends_with(',') {
                break;
            }
        }
        by_server.entry(server.to_string()).or_default().add(Stats {
            requests: 1,
            errors: u64::from(status >= 500),
            seconds: seconds.unwrap_or(0.0),
        });
    }
    by_server
}

/// The canary against everyone else, over one hold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub canary: Stats,
    pub baseline: Stats,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "canary {} requests, {:.1}% 5xx, {:.1} ms mean; others {} requests, {:.1}% 5xx, {:.1} ms mean",
            self.canary.requests,
            self.canary.error_rate() * 100.0,
            self.canary.mean_seconds() * 1000.0,
            self.baseline.requests,
            self.baseline.error_rate() * 100.0,
            self.baseline.mean_seconds() * 1000.0,
        )
    }
}

/// Latency differences below this are noise on an idle service, not a regression.
const LATENCY_SLACK_SECONDS: f64 = 0.010;

/// Passes the canary, or says which threshold it crossed.
pub fn judge(
    stats: &BTreeMap<String, Stats>,
    canary_servers: &BTreeSet<String>,
    config: &Judgement,
) -> Result<Verdict, String> {
    let mut verdict = Verdict {
        canary: Stats::default(),
        baseline: Stats::default(),
    };
    for (server, s) in stats {
        if canary_servers.contains(server) {
            verdict.canary.add(*s);
        } else {
            verdict.baseline.add(*s);
        }
    }
    if verdict.canary.requests < config.min_requests {
        return Err(format!(
            "too little canary traffic to judge ({} < canary.min_requests = {}): {verdict}",
            verdict.canary.requests, config.min_requests
        ));
    }
    let increase = verdict.canary.error_rate() - verdict.baseline.error_rate();
    if increase > config.max_error_rate_increase {
        return Err(format!(
            "5xx rate {:.1} points above the other hosts' (canary.max_error_rate_increase = {}): {verdict}",
            increase * 100.0,
            config.max_error_rate_increase
        ));
    }
    let limit = verdict.baseline.mean_seconds() * config.max_latency_ratio + LATENCY_SLACK_SECONDS;
    if verdict.baseline.requests > 0 && verdict.canary.mean_seconds() > limit {
        return Err(format!(
            "mean upstream time above {:.1} ms (canary.max_latency_ratio = {}): {verdict}",
            limit * 1000.0,
            config.max_latency_ratio
        ));
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Judgement {
        Judgement {
            max_error_rate_increase: 0.01,
            max_latency_ratio: 1.5,
            min_requests: 3,
        }
    }

    const LOG: &str = "\
10.0.1.11:8080 200 0.004 GET /
10.0.1.12:8080 200 0.003 POST /
10.0.1.11:8080 500 0.002 GET /
10.0.1.11:8080, 10.0.1.12:8080 200 0.001, 0.003 GET /
- 499 - GET /
10.0.1.11:8080 200 0.004
garbage
";

    #[test]
    fn retries_count_for_the_server_that_answered_last() {
        let stats = parse_log(LOG);
        assert_eq!(
            stats["10.0.1.11:8080"],
            Stats {
                requests: 3,
                errors: 1,
                seconds: 0.010
            }
        );
        assert_eq!(stats["10.0.1.12:8080"].requests, 2);
        assert!((stats["10.0.1.12:8080"].seconds - 0.006).abs() < 1e-9);
        assert_eq!(stats.len(), 2);
    }

    #[test]
    fn a_canary_with_more_errors_than_the_others_fails() {
        let stats = parse_log(LOG);
        let canary = BTreeSet::from(["10.0.1.11:8080".to_string()]);
        let err = judge(&stats, &canary, &config()).unwrap_err();
        assert!(err.contains("5xx rate 33.3 points above"), "{err}");
        let mut lenient = config();
        lenient.max_error_rate_increase = 0.5;
        let verdict = judge(&stats, &canary, &lenient).unwrap();
        assert_eq!(verdict.canary.requests, 3);
        assert_eq!(verdict.baseline.requests, 2);
    }

    #[test]
    fn a_slow_canary_fails_and_a_quiet_one_cannot_be_judged() {
        let log = "a:1 200 0.500\na:1 200 0.500\na:1 200 0.500\nb:1 200 0.010\nb:1 200 0.010\n";
        let stats = parse_log(log);
        let canary = BTreeSet::from(["a:1".to_string()]);
        assert!(
            judge(&stats, &canary, &config())
                .unwrap_err()
                .contains("mean upstream time")
        );
        let quiet = BTreeSet::from(["c:1".to_string()]);
        assert!(
            judge(&stats, &quiet, &config())
                .unwrap_err()
                .contains("too little canary traffic")
        );
    }
}
