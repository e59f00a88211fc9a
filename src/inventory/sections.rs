//! The inventory's structured parts (blue-green slots, canary steps, the upstream block,
//! `[[hosts]]`), each read and checked against the rest of the file.

use std::collections::BTreeMap;

use toml::{Table, Value};

use super::reader::join;
use super::*;

impl Reader {
    /// `app_port` is `app.port`, which adoption moves traffic away from.
    pub(super) fn blue_green(&mut self, t: &Table, app_port: u16) -> BlueGreenConfig {
        let s = "blue_green";
        self.unknown_keys(
            s,
            t,
            &[
                "blue_port",
                "green_port",
                "restart",
                "stop",
                "keep_old",
                "adopt_stop",
            ],
        );
        let config = BlueGreenConfig {
            blue_port: self.port(t, s, "blue_port", Some(8081)),
            green_port: self.port(t, s, "green_port", Some(8082)),
            restart: self.string(t, s, "restart", None),
            stop: self.string(t, s, "stop", None),
            keep_old: self.duration(t, s, "keep_old", Some("10m")),
            adopt_stop: self.optional_string(t, s, "adopt_stop"),
        };
        let port = app_port;
        if config.adopt_stop.is_some() && (port == config.blue_port || port == config.green_port) {
            self.problem(
                "blue_green.adopt_stop",
                format!("adopting needs app.port ({port}) to differ from both slots' ports, which the old process would still hold"),
            );
        }
        if config.blue_port == config.green_port {
            self.problem(
                "blue_green.green_port",
                "must differ from blue_green.blue_port",
            );
        }
        for (key, template) in [("restart", &config.restart), ("stop", &config.stop)] {
            if !template.is_empty() && !template.contains("{slot}") && !template.contains("{port}")
            {
                self.problem(
                    format!("blue_green.{key}"),
                    "must name the slot with {slot} or {port}, or both slots would get the same command",
                );
            }
        }
        config
    }

    pub(super) fn canary(&mut self, t: &Table) -> CanaryConfig {
        let s = "canary";
        self.unknown_keys(
            s,
            t,
            &[
                "hosts",
                "weights",
                "hold",
                "access_log",
                "max_error_rate_increase",
                "max_latency_ratio",
                "min_requests",
            ],
        );
        let hosts = match t.get("hosts") {
            None => MinHealthy::Hosts(1),
            Some(Value::Integer(n)) if *n >= 1 => MinHealthy::Hosts(*n as usize),
            Some(Value::String(v)) => {
                match v.trim().strip_suffix('%').map(|p| p.trim().parse::<u8>()) {
                    Some(Ok(p)) if (1..100).contains(&p) => MinHealthy::Percent(p),
                    _ => {
                        self.problem(
                            "canary.hosts",
                            format!("{v:?} is not a host count (1) or a percentage (\"10%\")"),
                        );
                        MinHealthy::Hosts(1)
                    }
                }
            }
            Some(other) => {
                self.problem(
                    "canary.hosts",
                    format!("must be a host count or a percentage, got {other}"),
                );
                MinHealthy::Hosts(1)
            }
        };
        let weights = match t.get("weights") {
            None => vec![10, 50, 100],
            Some(Value::Array(items)) => {
                let weights: Vec<u32> = items
                    .iter()
                    .filter_map(|v| v.as_integer())
                    .filter(|w| (1..=100).contains(w))
                    .map(|w| w as u32)
                    .collect();
                if weights.len() != items.len()
                    || weights.is_empty()
                    || weights.windows(2).any(|w| w[0] >= w[1])
                {
                    self.problem(
                        "canary.weights",
                        "must be rising percentages between 1 and 100, like [10, 50, 100]",
                    );
                }
                weights
            }
            Some(other) => {
                self.problem(
                    "canary.weights",
                    format!("must be a list of percentages, got {}", other.type_str()),
                );
                vec![100]
            }
        };
        let ratio = |r: &mut Reader, key: &str, default: f64, min: f64| -> f64 {
            match t.get(key) {
                None => default,
                Some(Value::Float(f)) if *f >= min => *f,
                Some(Value::Integer(i)) if *i as f64 >= min => *i as f64,
                Some(other) => {
                    r.problem(
                        format!("canary.{key}"),
                        format!("must be a number of at least {min}, got {other}"),
                    );
                    default
                }
            }
        };
        CanaryConfig {
            hosts,
            weights,
            hold: self.duration(t, s, "hold", Some("1m")),
            access_log: self.string(t, s, "access_log", None),
            max_error_rate_increase: ratio(self, "max_error_rate_increase", 0.01, 0.0),
            max_latency_ratio: ratio(self, "max_latency_ratio", 1.5, 1.0),
            min_requests: self.integer(t, s, "min_requests", Some(20), 1, 1_000_000_000) as u64,
        }
    }

    pub(super) fn min_healthy(&mut self, t: &Table) -> MinHealthy {
        let path = "balancer.min_healthy";
        match t.get("min_healthy") {
            None => MinHealthy::Hosts(1),
            Some(Value::Integer(n)) if *n >= 0 && *n <= 100_000 => MinHealthy::Hosts(*n as usize),
            Some(Value::String(s)) => {
                match s.trim().strip_suffix('%').map(|p| p.trim().parse::<u8>()) {
                    Some(Ok(p)) if p <= 100 => MinHealthy::Percent(p),
                    _ => {
                        self.problem(
                            path,
                            format!("{s:?} is not a host count (2) or a percentage (\"75%\")"),
                        );
                        MinHealthy::Hosts(1)
                    }
                }
            }
            Some(other) => {
                self.problem(
                    path,
                    format!("must be a host count or a percentage like \"75%\", got {other}"),
                );
                MinHealthy::Hosts(1)
            }
        }
    }

    pub(super) fn upstream_block(&mut self, lb: &Table) -> UpstreamBlock {
        let s = "balancer.upstream_block";
        let t = match lb.get("upstream_block") {
            None => return UpstreamBlock::default(),
            Some(Value::Table(t)) => t,
            Some(other) => {
                self.problem(s, format!("must be a table, got {}", other.type_str()));
                return UpstreamBlock::default();
            }
        };
        self.unknown_keys(
            s,
            t,
            &[
                "zone",
                "balance",
                "keepalive",
                "keepalive_timeout",
                "keepalive_requests",
            ],
        );
        let zone = self.optional_string(t, s, "zone");
        if let Some(size) = &zone {
            let digits = size.strip_suffix(['k', 'K', 'm', 'M']).unwrap_or(size);
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                self.problem(
                    join(s, "zone"),
                    format!("{size:?} is not a size like \"64k\" or \"1m\""),
                );
            }
        }
        let balance = self.optional_string(t, s, "balance");
        if let Some(method) = &balance
            && !is_balance(method)
        {
            self.problem(
                join(s, "balance"),
                format!(
                    "{method:?} is not one of least_conn, ip_hash, random, random two [least_conn], hash <key> [consistent]"
                ),
            );
        }
        UpstreamBlock {
            zone,
            balance,
            keepalive: self.optional_count(t, s, "keepalive", 1),
            keepalive_timeout: self.nginx_time(t, s, "keepalive_timeout"),
            keepalive_requests: self.optional_count(t, s, "keepalive_requests", 1),
        }
    }

    pub(super) fn hosts(&mut self, root: &Table) -> Vec<Host> {
        let items = match root.get("hosts") {
            None => {
                self.problem("hosts", "missing: add at least one [[hosts]] entry");
                return Vec::new();
            }
            Some(Value::Array(items)) => items,
            Some(other) => {
                self.problem(
                    "hosts",
                    format!(
                        "must be an array of tables ([[hosts]]), got {}",
                        other.type_str()
                    ),
                );
                return Vec::new();
            }
        };
        if items.is_empty() {
            self.problem("hosts", "must list at least one host");
        }
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut addresses: BTreeMap<String, usize> = BTreeMap::new();
        let mut hosts = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let section = format!("hosts[{i}]");
            let Value::Table(t) = item else {
                self.problem(section, format!("must be a table, got {}", item.type_str()));
                continue;
            };
            self.unknown_keys(
                &section,
                t,
                &[
                    "name",
                    "address",
                    "user",
                    "port",
                    "identity",
                    "proxy_jump",
                    "tags",
                    "max_fails",
                    "fail_timeout",
                    "max_conns",
                    "backup",
                ],
            );
            let server = ServerParams {
                max_fails: self.optional_count(t, &section, "max_fails", 0),
                fail_timeout: self.nginx_time(t, &section, "fail_timeout"),
                max_conns: self.optional_count(t, &section, "max_conns", 0),
                backup: self.flag(t, &section, "backup"),
            };
            let name = self.word(t, &section, "name", None);
            let user = t
                .contains_key("user")
                .then(|| self.word(t, &section, "user", None))
                .filter(|u| !u.is_empty());
            let address = self.string(t, &section, "address", None);
            if !address.is_empty() && !is_address(&address) {
                self.problem(
                    join(&section, "address"),
                    format!("{address:?} is not a host name or IP address"),
                );
            }
            if !name.is_empty()
                && let Some(first) = names.insert(name.clone(), i)
            {
                self.problem(
                    join(&section, "name"),
                    format!("duplicate {name:?} (also hosts[{first}].name)"),
                );
            }
            if !address.is_empty()
                && let Some(first) = addresses.insert(address.clone(), i)
            {
                self.problem(
                    join(&section, "address"),
                    format!("duplicate {address:?} (also hosts[{first}].address)"),
                );
            }
            let reach = self.host_reach(t, &section);
            let tags = self.tags(t, &section);
            hosts.push(Host {
                name,
                address,
                user,
                server,
                reach,
                tags,
            });
        }
        hosts
    }
}

/// nginx's balancing methods, with a `hash` key made of variables and plain characters only:
/// it is written into the upstream file as it is.
fn is_balance(method: &str) -> bool {
    let words: Vec<&str> = method.split_whitespace().collect();
    match words.as_slice() {
        ["least_conn"] | ["ip_hash"] | ["random"] | ["random", "two"] => true,
        ["random", "two", "least_conn"] => true,
        ["hash", key] | ["hash", key, "consistent"] => key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '$' | '_' | '-' | '.' | ':' | '/')),
        _ => false,
    }
}
