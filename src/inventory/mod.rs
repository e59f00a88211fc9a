//! The inventory file, read and validated as a whole before anything touches a host.
//!
//! Parsing goes through a generic TOML table rather than `#[derive(Deserialize)]` so that one
//! pass can report every problem at once, each with its key path, instead of stopping at the
//! first one.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use toml::Table;

use crate::discovery::Discovery;
use crate::error::{Error, Problem, Result};

mod discovery;
mod hooks;
mod reader;
mod sections;
mod slot;
mod ssh;

pub use hooks::HooksConfig;
pub use slot::Slot;
pub use ssh::{HostReach, SshConfig, SshConfigFile};

use reader::Reader;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inventory {
    pub strategy: Strategy,
    pub ssh: SshConfig,
    pub app: AppConfig,
    pub health: HealthConfig,
    pub balancer: BalancerConfig,
    pub blue_green: Option<BlueGreenConfig>,
    pub canary: Option<CanaryConfig>,
    pub hooks: HooksConfig,
    /// `[discovery.ec2]`: `hosts` stays empty until a command asks the source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<Discovery>,
    pub hosts: Vec<Host>,
}

/// How a release reaches the fleet; the README's Strategies section describes all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Batch by batch, each out of the pool while it changes.
    #[default]
    Rolling,
    /// Start the new release in the idle slot of every host, then move all traffic at once.
    BlueGreen,
    /// A first batch gets a reduced share of traffic and is watched before the rest follow.
    Canary,
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "rolling" => Ok(Strategy::Rolling),
            "blue-green" => Ok(Strategy::BlueGreen),
            "canary" => Ok(Strategy::Canary),
            other => Err(format!(
                "{other:?} is not a strategy: rolling, blue-green or canary"
            )),
        }
    }
}

/// Two slots of the app on every host; Nginx sends traffic to one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlueGreenConfig {
    pub blue_port: u16,
    pub green_port: u16,
    /// Starts (or restarts) one slot: `{slot}` becomes `blue` or `green`, `{port}` its port.
    pub restart: String,
    /// Stops one slot, with the same placeholders.
    pub stop: String,
    /// How long the old slots keep running after a switch, for an instant switch-back.
    #[serde(with = "human")]
    pub keep_old: Duration,
    /// Adopting blue-green on a running single-port deployment: stops the process on
    /// `app.port` once the first blue-green release has moved traffic to the blue slots, after
    /// `keep_old`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adopt_stop: Option<String>,
}

impl BlueGreenConfig {
    pub fn port(&self, slot: Slot) -> u16 {
        match slot {
            Slot::Blue => self.blue_port,
            Slot::Green => self.green_port,
        }
    }

    /// `template` with `{slot}` and `{port}` filled in. Both are plain words, so the command
    /// stays exactly as safe as the template the operator wrote.
    pub fn command(&self, template: &str, slot: Slot) -> String {
        template
            .replace("{slot}", slot.as_str())
            .replace("{port}", &self.port(slot).to_string())
    }
}

/// A first batch with a reduced Nginx weight, watched through the load balancer's access log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CanaryConfig {
    pub hosts: MinHealthy,
    /// Percent of a host's fair share of traffic, held in turn.
    pub weights: Vec<u32>,
    #[serde(with = "human")]
    pub hold: Duration,
    /// On every load balancer, written with roller's log format (see the README).
    pub access_log: String,
    /// Abort when the canary's share of 5xx exceeds the other hosts' by more than this.
    pub max_error_rate_increase: f64,
    /// Abort when the canary's mean upstream time exceeds the other hosts' by this factor
    /// (plus 10 ms of slack, so that idle microsecond noise does not count).
    pub max_latency_ratio: f64,
    /// Fewer canary requests than this in a hold cannot be judged, and abort.
    pub min_requests: u64,
}

impl Eq for CanaryConfig {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppConfig {
    pub name: String,
    /// `releases/<release>/<jar_name>` and the `current` link live here. A relative path is
    /// taken from the SSH login directory.
    pub dir: String,
    pub jar_name: String,
    pub restart: String,
    pub port: u16,
    pub keep_releases: usize,
    /// Every command on app hosts runs as root, as `sudo -n /bin/sh -c '<command>'`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sudo: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthConfig {
    pub path: String,
    pub expect_status: u16,
    #[serde(with = "human")]
    pub interval: Duration,
    #[serde(with = "human")]
    pub timeout: Duration,
    pub successes: u32,
    /// Run on the host when its sshd refuses port forwarding: healthy when it exits 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalancerConfig {
    pub hosts: Vec<String>,
    pub upstream_file: String,
    pub upstream: String,
    /// Checks the configuration without applying it: run during pre-flight.
    pub test: String,
    pub reload: String,
    /// The nginx master's pid file, used to confirm that a reload started new workers.
    pub pid_file: String,
    #[serde(with = "human")]
    pub drain_timeout: Duration,
    /// How long a drained host must have had no connection from a load balancer before it
    /// counts as drained: one sample of "none" can fall between a request being accepted by
    /// nginx and nginx connecting to the host.
    #[serde(with = "human")]
    pub drain_quiet: Duration,
    /// Where the deploy lock and the rollout state live on the first load balancer.
    pub state_dir: String,
    /// The fewest healthy hosts that must stay in the pool while a batch is out.
    pub min_healthy: MinHealthy,
    /// Where the deploy lock, the rollout state and canary decisions live: `balancer.lock_host`,
    /// else the first of `hosts` in sorted order, so that every inventory naming the same load
    /// balancers, in whatever order, finds the same lock.
    pub lock_host: String,
    /// How long the deploy lock lives without renewal.
    pub lock_lease: Duration,
    /// `[balancer.upstream_block]`: directives written into the upstream block.
    pub upstream_block: UpstreamBlock,
    /// Every command on load balancers (the lock host's included) runs as root, as
    /// `sudo -n /bin/sh -c '<command>'`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sudo: bool,
}

/// `min_healthy`: a host count, or a share of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MinHealthy {
    Hosts(usize),
    Percent(u8),
}

impl MinHealthy {
    pub fn hosts(self, total: usize) -> usize {
        match self {
            MinHealthy::Hosts(n) => n,
            MinHealthy::Percent(p) => (total * p as usize).div_ceil(100),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Host {
    pub name: String,
    pub address: String,
    /// The SSH login on this host, when it is not `ssh.user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// nginx `server` parameters for this host, written at every rewrite of the upstream file.
    #[serde(skip_serializing_if = "ServerParams::is_default")]
    pub server: ServerParams,
    /// How this host is reached where it differs from `[ssh]`.
    #[serde(skip_serializing_if = "HostReach::is_default")]
    pub reach: HostReach,
    /// Labels of the host (`tags`), kept with it in the plan.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// Per-server parameters of nginx's `server` directive that roller keeps; `weight` and `down`
/// are roller's own (canary shares, batches out of the pool).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServerParams {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_fails: Option<u32>,
    /// In nginx's syntax (`10s`, `500ms`), checked as a duration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_conns: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub backup: bool,
}

impl ServerParams {
    pub fn is_default(&self) -> bool {
        *self == ServerParams::default()
    }
}

/// Directives of the upstream block that roller writes above the `server` lines, so that the
/// block people run in production survives every rewrite.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UpstreamBlock {
    /// `zone <upstream> <size>`: shared memory, so that workers share state and counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// `least_conn`, `ip_hash`, `random [two [least_conn]]` or `hash <key> [consistent]`;
    /// round robin when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<String>,
    /// Idle connections to the servers that each worker keeps open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<u32>,
    /// In nginx's syntax (`60s`), checked as a duration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_requests: Option<u32>,
}

impl UpstreamBlock {
    /// Whether the balancing method lets a server be a `backup` (hash and random do not).
    pub fn allows_backup(&self) -> bool {
        !self.balance.as_deref().is_some_and(|b| {
            b.starts_with("hash") || b.starts_with("ip_hash") || b.starts_with("random")
        })
    }
}

pub(crate) mod human {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

impl Inventory {
    /// Reads and validates `file`. Errors name the file and every problem found.
    pub fn load(file: &Path) -> Result<Inventory> {
        let text = std::fs::read_to_string(file).map_err(|source| Error::InventoryRead {
            file: file.to_path_buf(),
            source,
        })?;
        let mut inventory = Inventory::parse(&text).map_err(|problems| Error::Inventory {
            file: file.to_path_buf(),
            problems,
        })?;
        inventory.apply_host_names()?;
        Ok(inventory)
    }

    /// Validates inventory text; on failure returns every problem, in file order of sections.
    pub fn parse(text: &str) -> std::result::Result<Inventory, Vec<Problem>> {
        let root: Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                return Err(vec![Problem {
                    key: "(syntax)".into(),
                    message: e.to_string().trim().replace('\n', " "),
                }]);
            }
        };
        let mut r = Reader::default();
        r.unknown_keys(
            "",
            &root,
            &[
                "strategy",
                "ssh",
                "app",
                "health",
                "balancer",
                "blue_green",
                "canary",
                "hooks",
                "discovery",
                "hosts",
            ],
        );
        let strategy = match r.optional_string(&root, "", "strategy") {
            None => Strategy::Rolling,
            Some(s) => s.parse().unwrap_or_else(|e: String| {
                r.problem("strategy", e);
                Strategy::Rolling
            }),
        };

        let empty = Table::new();
        let ssh_t = r.section(&root, "ssh").unwrap_or(&empty);
        let app_t = r.section(&root, "app").unwrap_or(&empty);
        let health_t = r.optional_section(&root, "health").unwrap_or(&empty);
        let lb_t = r.section(&root, "balancer").unwrap_or(&empty);

        let ssh = r.ssh(ssh_t);

        r.unknown_keys(
            "app",
            app_t,
            &[
                "name",
                "dir",
                "jar_name",
                "restart",
                "port",
                "keep_releases",
                "sudo",
            ],
        );
        let app = AppConfig {
            name: r.word(app_t, "app", "name", None),
            dir: r.string(app_t, "app", "dir", None),
            jar_name: r.word(app_t, "app", "jar_name", Some("app.jar")),
            restart: r.string(app_t, "app", "restart", None),
            port: r.port(app_t, "app", "port", None),
            keep_releases: r.integer(app_t, "app", "keep_releases", Some(5), 2, 1000) as usize,
            sudo: r.flag(app_t, "app", "sudo"),
        };
        if matches!(app.jar_name.as_str(), "." | "..") {
            r.problem("app.jar_name", "must be a file name, not \".\" or \"..\"");
        }

        r.unknown_keys(
            "health",
            health_t,
            &[
                "path",
                "expect_status",
                "interval",
                "timeout",
                "successes",
                "command",
            ],
        );
        let health = HealthConfig {
            path: r.string(health_t, "health", "path", Some("/actuator/health")),
            expect_status: r.integer(health_t, "health", "expect_status", Some(200), 100, 599)
                as u16,
            // A probe right after the restart, then one per interval: 100ms adds about 50ms on
            // average once the app is ready, for a probe that costs one channel.
            interval: r.duration(health_t, "health", "interval", Some("100ms")),
            timeout: r.duration(health_t, "health", "timeout", Some("60s")),
            successes: r.integer(health_t, "health", "successes", Some(1), 1, 1000) as u32,
            command: r.optional_string(health_t, "health", "command"),
        };
        if !health.path.starts_with('/') || health.path.chars().any(char::is_whitespace) {
            r.problem(
                "health.path",
                format!(
                    "must start with \"/\" and contain no spaces, got {:?}",
                    health.path
                ),
            );
        }
        if health.timeout < health.interval {
            r.problem(
                "health.timeout",
                "must be at least health.interval".to_string(),
            );
        }

        r.unknown_keys(
            "balancer",
            lb_t,
            &[
                "hosts",
                "upstream_file",
                "upstream",
                "test",
                "reload",
                "pid_file",
                "drain_timeout",
                "drain_quiet",
                "state_dir",
                "min_healthy",
                "lock_host",
                "lock_lease",
                "upstream_block",
                "sudo",
            ],
        );
        let default_upstream = if app.name.is_empty() {
            "app".to_string()
        } else {
            app.name.clone()
        };
        let balancer = BalancerConfig {
            hosts: r.address_list(lb_t, "balancer", "hosts"),
            upstream_file: r.string(lb_t, "balancer", "upstream_file", None),
            upstream: r.word(lb_t, "balancer", "upstream", Some(&default_upstream)),
            test: r.string(lb_t, "balancer", "test", Some("nginx -t")),
            reload: r.string(
                lb_t,
                "balancer",
                "reload",
                Some("nginx -t && nginx -s reload"),
            ),
            pid_file: r.string(lb_t, "balancer", "pid_file", Some("/run/nginx.pid")),
            drain_timeout: r.duration(lb_t, "balancer", "drain_timeout", Some("30s")),
            drain_quiet: r.duration(lb_t, "balancer", "drain_quiet", Some("100ms")),
            state_dir: String::new(),
            min_healthy: r.min_healthy(lb_t),
            lock_host: String::new(),
            lock_lease: r.duration(lb_t, "balancer", "lock_lease", Some("60s")),
            upstream_block: r.upstream_block(lb_t),
            sudo: r.flag(lb_t, "balancer", "sudo"),
        };
        if balancer.lock_lease < Duration::from_secs(3) {
            r.problem(
                "balancer.lock_lease",
                "must be at least 3s: it is renewed every third of it",
            );
        }
        let lock_host = match r.optional_string(lb_t, "balancer", "lock_host") {
            Some(host) if balancer.hosts.contains(&host) => host,
            Some(host) => {
                r.problem(
                    "balancer.lock_host",
                    format!("{host:?} is not one of balancer.hosts"),
                );
                host
            }
            None => balancer.hosts.iter().min().cloned().unwrap_or_default(),
        };
        if balancer.drain_quiet >= balancer.drain_timeout {
            r.problem(
                "balancer.drain_quiet",
                "must be shorter than balancer.drain_timeout".to_string(),
            );
        }
        let balancer = BalancerConfig {
            state_dir: match r.optional_string(lb_t, "balancer", "state_dir") {
                Some(dir) => dir,
                None => default_state_dir(&balancer.upstream_file),
            },
            lock_host,
            ..balancer
        };

        let blue_green = r
            .optional_section(&root, "blue_green")
            .map(|t| r.blue_green(t, app.port));
        if strategy == Strategy::BlueGreen && blue_green.is_none() {
            r.problem(
                "blue_green",
                "missing section: strategy \"blue-green\" needs ports and slot commands",
            );
        }
        let canary = r.optional_section(&root, "canary").map(|t| r.canary(t));
        if strategy == Strategy::Canary && canary.is_none() {
            r.problem(
                "canary",
                "missing section: strategy \"canary\" needs at least canary.access_log",
            );
        }

        let discovery = r.discovery(&root);
        let hosts = match &discovery {
            Some(_) if root.contains_key("hosts") => {
                r.problem(
                    "hosts",
                    "[[hosts]] and [discovery] exclude each other: list the hosts, or find them",
                );
                Vec::new()
            }
            Some(_) => Vec::new(),
            None if root.contains_key("discovery") => Vec::new(),
            None => r.hosts(&root),
        };
        if !balancer.upstream_block.allows_backup() {
            for (i, host) in hosts.iter().enumerate() {
                if host.server.backup {
                    r.problem(
                        format!("hosts[{i}].backup"),
                        format!(
                            "nginx does not allow backup servers with balancer.upstream_block.balance = {:?}",
                            balancer.upstream_block.balance.as_deref().unwrap_or_default()
                        ),
                    );
                }
            }
        }
        let hooks = r.hooks(&root);
        if !r.problems.is_empty() {
            return Err(r.finish());
        }
        Ok(Inventory {
            strategy,
            ssh,
            app,
            health,
            balancer,
            blue_green,
            canary,
            hooks,
            discovery,
            hosts,
        })
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

/// Beside the upstream file, because whoever may rewrite that file may write there too.
pub(super) fn default_state_dir(upstream_file: &str) -> String {
    match upstream_file.rsplit_once('/') {
        Some(("", _)) => "/.roller".to_string(),
        Some((dir, _)) => format!("{dir}/.roller"),
        None => ".roller".to_string(),
    }
}

/// Names that end up in file names, upstream blocks and unquoted log lines.
pub fn is_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A host name or IP literal: what nginx's `server` directive and `ss` filters accept.
pub fn is_address(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
}

/// The smallest valid inventory but for its hosts, for the unit tests of the modules that read
/// one: append `[[hosts]]` tables.
#[cfg(test)]
pub(crate) const MINIMAL: &str = r#"
[ssh]
user = "deploy"
[app]
name = "shop"
dir = "/srv/shop"
restart = "systemctl restart shop"
port = 8080
[balancer]
hosts = ["lb-1"]
upstream_file = "/etc/nginx/conf.d/shop.conf"
"#;
