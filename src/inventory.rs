//! The inventory file, read and validated as a whole before anything touches a host.
//!
//! Parsing goes through a generic TOML table rather than `#[derive(Deserialize)]` so that one
//! pass can report every problem at once, each with its key path, instead of stopping at the
//! first one.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use toml::{Table, Value};

use crate::error::{Error, Problem, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inventory {
    pub strategy: Strategy,
    pub ssh: SshConfig,
    pub app: AppConfig,
    pub health: HealthConfig,
    pub balancer: BalancerConfig,
    pub blue_green: Option<BlueGreenConfig>,
    pub canary: Option<CanaryConfig>,
    pub hosts: Vec<Host>,
}

/// How a release reaches the fleet; the design notes describe all three.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Slot {
    Blue,
    Green,
}

impl Slot {
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Blue => "blue",
            Slot::Green => "green",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::Blue => Slot::Green,
            Slot::Green => Slot::Blue,
        }
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
pub struct SshConfig {
    pub user: String,
    pub port: u16,
    /// Private key file; `None` means the ssh-agent.
    pub identity: Option<PathBuf>,
    pub known_hosts: PathBuf,
    #[serde(with = "human")]
    pub connect_timeout: Duration,
    /// Accept SHA-1 `ssh-rsa` host-key signatures (old servers only).
    pub allow_sha1_rsa: bool,
}

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    pub name: String,
    pub address: String,
    /// The SSH login on this host, when it is not `ssh.user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// nginx `server` parameters for this host, written at every rewrite of the upstream file.
    #[serde(skip_serializing_if = "ServerParams::is_default")]
    pub server: ServerParams,
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
        Inventory::parse(&text).map_err(|problems| Error::Inventory {
            file: file.to_path_buf(),
            problems,
        })
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

        r.unknown_keys(
            "ssh",
            ssh_t,
            &[
                "user",
                "port",
                "identity",
                "known_hosts",
                "connect_timeout",
                "allow_sha1_rsa",
            ],
        );
        let ssh = SshConfig {
            user: r.word(ssh_t, "ssh", "user", None),
            port: r.port(ssh_t, "ssh", "port", Some(22)),
            identity: r
                .optional_string(ssh_t, "ssh", "identity")
                .map(|p| expand_home(&p)),
            known_hosts: expand_home(&r.string(
                ssh_t,
                "ssh",
                "known_hosts",
                Some("~/.ssh/known_hosts"),
            )),
            connect_timeout: r.duration(ssh_t, "ssh", "connect_timeout", Some("10s")),
            allow_sha1_rsa: match ssh_t.get("allow_sha1_rsa") {
                None => false,
                Some(toml::Value::Boolean(b)) => *b,
                Some(other) => {
                    r.problem(
                        "ssh.allow_sha1_rsa",
                        format!("must be true or false, got {other}"),
                    );
                    false
                }
            },
        };

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
            ],
        );
        let app = AppConfig {
            name: r.word(app_t, "app", "name", None),
            dir: r.string(app_t, "app", "dir", None),
            jar_name: r.word(app_t, "app", "jar_name", Some("app.jar")),
            restart: r.string(app_t, "app", "restart", None),
            port: r.port(app_t, "app", "port", None),
            keep_releases: r.integer(app_t, "app", "keep_releases", Some(5), 2, 1000) as usize,
        };
        if matches!(app.jar_name.as_str(), "." | "..") {
            r.problem("app.jar_name", "must be a file name, not \".\" or \"..\"");
        }

        r.unknown_keys(
            "health",
            health_t,
            &["path", "expect_status", "interval", "timeout", "successes"],
        );
        let health = HealthConfig {
            path: r.string(health_t, "health", "path", Some("/actuator/health")),
            expect_status: r.integer(health_t, "health", "expect_status", Some(200), 100, 599)
                as u16,
            interval: r.duration(health_t, "health", "interval", Some("500ms")),
            timeout: r.duration(health_t, "health", "timeout", Some("60s")),
            successes: r.integer(health_t, "health", "successes", Some(1), 1, 1000) as u32,
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

        let hosts = r.hosts(&root);
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
            hosts,
        })
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

/// Beside the upstream file, because whoever may rewrite that file may write there too.
fn default_state_dir(upstream_file: &str) -> String {
    match upstream_file.rsplit_once('/') {
        Some(("", _)) => "/.roller".to_string(),
        Some((dir, _)) => format!("{dir}/.roller"),
        None => ".roller".to_string(),
    }
}

/// `~/x` is how people write key paths; the shell is not there to expand it for us.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
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
fn is_address(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
}

/// Collects problems while reading values, so that one pass reports them all.
#[derive(Default)]
struct Reader {
    problems: Vec<Problem>,
}

impl Reader {
    /// Problems in file order of sections; a missing or mistyped section is reported once,
    /// not once more for every key it would have held.
    fn finish(self) -> Vec<Problem> {
        const ORDER: [&str; 5] = ["ssh", "app", "health", "balancer", "hosts"];
        let section_of = |key: &str| key.split(['.', '[']).next().unwrap_or_default().to_string();
        let broken: HashSet<String> = self
            .problems
            .iter()
            .filter(|p| !p.key.contains(['.', '[']) && p.key != "hosts")
            .map(|p| p.key.clone())
            .collect();
        let mut problems: Vec<Problem> = self
            .problems
            .into_iter()
            .filter(|p| !(p.key.contains('.') && broken.contains(&section_of(&p.key))))
            .collect();
        problems.sort_by_key(|p| {
            let section = section_of(&p.key);
            ORDER.iter().position(|s| *s == section).unwrap_or(0)
        });
        problems
    }

    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn unknown_keys(&mut self, section: &str, table: &Table, known: &[&str]) {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                let path = join(section, key);
                self.problem(
                    path,
                    format!("unknown key (expected one of: {})", known.join(", ")),
                );
            }
        }
    }

    fn section<'t>(&mut self, root: &'t Table, name: &str) -> Option<&'t Table> {
        match root.get(name) {
            None => {
                self.problem(name, "missing section");
                None
            }
            Some(_) => self.optional_section(root, name),
        }
    }

    fn optional_section<'t>(&mut self, root: &'t Table, name: &str) -> Option<&'t Table> {
        match root.get(name) {
            None => None,
            Some(Value::Table(t)) => Some(t),
            Some(other) => {
                self.problem(name, format!("must be a table, got {}", other.type_str()));
                None
            }
        }
    }

    fn raw_string(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        default: Option<&str>,
    ) -> Option<String> {
        let path = join(section, key);
        match t.get(key) {
            Some(Value::String(s)) if s.trim().is_empty() => {
                self.problem(path, "must not be empty");
                None
            }
            Some(Value::String(s)) if s.contains(['\0', '\n', '\r']) => {
                self.problem(path, "must be a single line");
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.problem(path, format!("must be a string, got {}", other.type_str()));
                None
            }
            None => match default {
                Some(d) => Some(d.to_string()),
                None => {
                    self.problem(path, "missing");
                    None
                }
            },
        }
    }

    fn string(&mut self, t: &Table, section: &str, key: &str, default: Option<&str>) -> String {
        self.raw_string(t, section, key, default)
            .unwrap_or_default()
    }

    fn optional_string(&mut self, t: &Table, section: &str, key: &str) -> Option<String> {
        t.get(key)?;
        self.raw_string(t, section, key, None)
    }

    fn word(&mut self, t: &Table, section: &str, key: &str, default: Option<&str>) -> String {
        let value = self.raw_string(t, section, key, default);
        match value {
            Some(v) if !is_word(&v) => {
                self.problem(
                    join(section, key),
                    format!("{v:?} may only contain letters, digits, '.', '_' and '-'"),
                );
                String::new()
            }
            v => v.unwrap_or_default(),
        }
    }

    fn integer(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        default: Option<i64>,
        min: i64,
        max: i64,
    ) -> i64 {
        let path = join(section, key);
        let value = match t.get(key) {
            Some(Value::Integer(i)) => *i,
            Some(other) => {
                self.problem(
                    path,
                    format!("must be an integer, got {}", other.type_str()),
                );
                return default.unwrap_or(min);
            }
            None => match default {
                Some(d) => d,
                None => {
                    self.problem(path, "missing");
                    return min;
                }
            },
        };
        if value < min || value > max {
            self.problem(
                path,
                format!("must be between {min} and {max}, got {value}"),
            );
            return min;
        }
        value
    }

    fn port(&mut self, t: &Table, section: &str, key: &str, default: Option<i64>) -> u16 {
        self.integer(t, section, key, default, 1, 65535) as u16
    }

    fn duration(&mut self, t: &Table, section: &str, key: &str, default: Option<&str>) -> Duration {
        let Some(text) = self.raw_string(t, section, key, default) else {
            return Duration::ZERO;
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d.is_zero() => {
                self.problem(join(section, key), "must be greater than zero");
                Duration::ZERO
            }
            Ok(d) => d,
            Err(_) => {
                self.problem(
                    join(section, key),
                    format!("{text:?} is not a duration like \"500ms\", \"10s\" or \"2m\""),
                );
                Duration::ZERO
            }
        }
    }

    /// `app_port` is `app.port`, which adoption moves traffic away from.
    fn blue_green(&mut self, t: &Table, app_port: u16) -> BlueGreenConfig {
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

    fn canary(&mut self, t: &Table) -> CanaryConfig {
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

    fn min_healthy(&mut self, t: &Table) -> MinHealthy {
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

    fn address_list(&mut self, t: &Table, section: &str, key: &str) -> Vec<String> {
        let path = join(section, key);
        let Some(value) = t.get(key) else {
            self.problem(path, "missing: list every nginx host in front of the app");
            return Vec::new();
        };
        let Value::Array(items) = value else {
            self.problem(
                path,
                format!("must be a list of addresses, got {}", value.type_str()),
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.problem(path.clone(), "must name at least one load-balancer host");
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            match item {
                Value::String(s) if !is_address(s) => {
                    self.problem(item_path, format!("{s:?} is not a host name or IP address"))
                }
                Value::String(s) if !seen.insert(s.clone()) => {
                    self.problem(item_path, format!("duplicate {s:?}"))
                }
                Value::String(s) => out.push(s.clone()),
                other => self.problem(
                    item_path,
                    format!("must be a string, got {}", other.type_str()),
                ),
            }
        }
        out
    }

    /// An optional whole number from `min` up, for nginx parameters.
    fn optional_count(&mut self, t: &Table, section: &str, key: &str, min: i64) -> Option<u32> {
        t.get(key)?;
        Some(self.integer(t, section, key, None, min, 1_000_000) as u32)
    }

    fn flag(&mut self, t: &Table, section: &str, key: &str) -> bool {
        match t.get(key) {
            None => false,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                self.problem(
                    join(section, key),
                    format!("must be true or false, got {}", other.type_str()),
                );
                false
            }
        }
    }

    /// A duration in nginx's own syntax (`10s`, `500ms`, `1m`), written as given.
    fn nginx_time(&mut self, t: &Table, section: &str, key: &str) -> Option<String> {
        let text = self.optional_string(t, section, key)?;
        let valid = text
            .strip_suffix("ms")
            .or_else(|| text.strip_suffix(['s', 'm', 'h']))
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if !valid {
            self.problem(
                join(section, key),
                format!("{text:?} is not an nginx time like \"500ms\", \"10s\" or \"1m\""),
            );
            return None;
        }
        Some(text)
    }

    fn upstream_block(&mut self, lb: &Table) -> UpstreamBlock {
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

    fn hosts(&mut self, root: &Table) -> Vec<Host> {
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
            hosts.push(Host {
                name,
                address,
                user,
                server,
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

fn join(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_string()
    } else {
        format!("{section}.{key}")
    }
}
