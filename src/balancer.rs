//! Load-balancer drivers: how a pool change becomes a file, a reload and a drain check.
//!
//! The executor only knows [`Balancer`]; Nginx with a roller-owned upstream file is the one
//! driver today. Another (HAProxy, a cloud target group) would render its own commands.

use std::collections::{BTreeMap, BTreeSet};

use crate::inventory::{AppConfig, BalancerConfig, Host};
use crate::remote;

/// Which hosts receive traffic, on which port, and how much of it. Hosts not in `down` are in
/// the pool.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Pool {
    pub down: BTreeSet<String>,
    /// The port every host is reached on, when not `app.port`: the live blue-green slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Percent of a host's fair share of traffic, for hosts not at 100 (a canary).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<String, u32>,
}

impl Pool {
    pub fn with_down<'a>(hosts: impl IntoIterator<Item = &'a String>) -> Pool {
        Pool {
            down: hosts.into_iter().cloned().collect(),
            ..Pool::default()
        }
    }
}

/// Exit codes of the apply command, so the executor can tell a refused configuration (nothing
/// changed) from a reload that never took effect.
pub const APPLY_REJECTED: u32 = 3;
pub const APPLY_UNCONFIRMED: u32 = 4;

pub trait Balancer: Send + Sync {
    /// The configuration that puts exactly the hosts outside `pool.down` in rotation.
    fn render(&self, pool: &Pool) -> String;
    /// Reads the rendered configuration on stdin, installs it atomically, validates and
    /// reloads, restores the old file if validation fails, and exits 0 only once the new
    /// configuration is serving.
    fn apply_command(&self) -> String;
    /// Validates the live configuration without changing anything.
    fn test_command(&self) -> String;
    /// Prints the live configuration, which [`Balancer::parse_down`] and
    /// [`Balancer::parse_port`] read, and does nothing else (no validation, no check of who
    /// may write it): `roller status`.
    fn show_command(&self) -> String;
    /// Prints the number of connections from this load balancer still open to `hosts` and,
    /// on a second line where it can tell, how many of its processes from before the last pool
    /// change are still alive: 0 there means everything left routes with the current pool.
    fn in_flight_command(&self, hosts: &[&Host]) -> String;
    /// The hosts that a configuration printed by [`Balancer::test_command`] marks down.
    fn parse_down(&self, output: &str) -> BTreeSet<String>;
    /// The port every host is reached on in that configuration, if they all share one.
    fn parse_port(&self, output: &str) -> Option<u16>;
    /// How the load balancer names `host` in its logs (`address:port`).
    fn server(&self, host: &Host) -> String;
}

pub struct Nginx {
    pub config: BalancerConfig,
    pub hosts: Vec<Host>,
    pub app_port: u16,
}

impl Nginx {
    pub fn new(config: &BalancerConfig, app: &AppConfig, hosts: &[Host]) -> Nginx {
        Nginx {
            config: config.clone(),
            hosts: hosts.to_vec(),
            app_port: app.port,
        }
    }

    fn socket(&self, host: &Host) -> String {
        self.socket_on(host, self.app_port)
    }

    fn socket_on(&self, host: &Host, port: u16) -> String {
        if host.address.contains(':') {
            format!("[{}]:{port}", host.address)
        } else {
            format!("{}:{port}", host.address)
        }
    }

    /// `server` lines of a rendered upstream: (socket, flags) pairs.
    fn servers(output: &str) -> impl Iterator<Item = (&str, &str)> {
        output
            .lines()
            .filter_map(|l| l.trim().strip_prefix("server "))
            .filter_map(|l| l.split(';').next())
            .map(|l| l.trim().split_once(' ').unwrap_or((l.trim(), "")))
    }
}

impl Balancer for Nginx {
    fn render(&self, pool: &Pool) -> String {
        let mut out = format!(
            "# Managed by roller: rewritten at every step of a rollout; edits here are lost.\nupstream {} {{\n",
            self.config.upstream
        );
        let block = &self.config.upstream_block;
        if let Some(size) = &block.zone {
            out.push_str(&format!("    zone {} {size};\n", self.config.upstream));
        }
        if let Some(method) = &block.balance {
            out.push_str(&format!("    {method};\n"));
        }
        if let Some(n) = block.keepalive {
            out.push_str(&format!("    keepalive {n};\n"));
        }
        if let Some(t) = &block.keepalive_timeout {
            out.push_str(&format!("    keepalive_timeout {t};\n"));
        }
        if let Some(n) = block.keepalive_requests {
            out.push_str(&format!("    keepalive_requests {n};\n"));
        }
        // A weight is relative to the others: hosts at their full share get 100, so a canary
        // at 10% of its fair share gets weight 10.
        let weighted = !pool.weights.is_empty();
        for host in &self.hosts {
            let weight = match (weighted, pool.weights.get(&host.name)) {
                (false, _) => String::new(),
                (true, Some(w)) => format!(" weight={w}"),
                (true, None) => " weight=100".to_string(),
            };
            let down = if pool.down.contains(&host.name) {
                " down"
            } else {
                ""
            };
            let mut params = String::new();
            if let Some(n) = host.server.max_fails {
                params.push_str(&format!(" max_fails={n}"));
            }
            if let Some(t) = &host.server.fail_timeout {
                params.push_str(&format!(" fail_timeout={t}"));
            }
            if let Some(n) = host.server.max_conns {
                params.push_str(&format!(" max_conns={n}"));
            }
            if host.server.backup {
                params.push_str(" backup");
            }
            out.push_str(&format!(
                "    server {}{weight}{params}{down};  # {}\n",
                self.socket_on(host, pool.port.unwrap_or(self.app_port)),
                host.name
            ));
        }
        out.push_str("}\n");
        out
    }

    fn apply_command(&self) -> String {
        remote::nginx::apply(&self.config)
    }

    fn test_command(&self) -> String {
        remote::nginx::test(&self.config)
    }

    fn show_command(&self) -> String {
        remote::nginx::show(&self.config)
    }

    fn parse_down(&self, output: &str) -> BTreeSet<String> {
        let down: BTreeSet<String> = Nginx::servers(output)
            .filter(|(_, flags)| flags.split_whitespace().any(|f| f == "down"))
            .map(|(socket, _)| socket.to_string())
            .collect();
        let port = self.parse_port(output).unwrap_or(self.app_port);
        self.hosts
            .iter()
            .filter(|h| down.contains(&self.socket_on(h, port)))
            .map(|h| h.name.clone())
            .collect()
    }

    fn server(&self, host: &Host) -> String {
        self.socket(host)
    }

    fn parse_port(&self, output: &str) -> Option<u16> {
        let ports: BTreeSet<u16> = Nginx::servers(output)
            .filter_map(|(socket, _)| socket.rsplit_once(':'))
            .filter_map(|(_, port)| port.parse().ok())
            .collect();
        match ports.len() {
            1 => ports.into_iter().next(),
            _ => None,
        }
    }

    fn in_flight_command(&self, hosts: &[&Host]) -> String {
        let sockets: Vec<String> = hosts.iter().map(|h| self.socket(h)).collect();
        remote::nginx::in_flight(&self.config, &sockets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nginx() -> Nginx {
        let config = BalancerConfig {
            hosts: vec!["10.0.0.5".into()],
            upstream_file: "/etc/nginx/conf.d/shop-upstream.conf".into(),
            upstream: "shop".into(),
            test: "nginx -t".into(),
            reload: "nginx -t && nginx -s reload".into(),
            pid_file: "/run/nginx.pid".into(),
            drain_timeout: std::time::Duration::from_secs(30),
            drain_quiet: std::time::Duration::from_millis(100),
            state_dir: "/etc/nginx/conf.d/.roller".into(),
            min_healthy: crate::inventory::MinHealthy::Hosts(1),
            lock_host: "10.0.0.5".into(),
            lock_lease: std::time::Duration::from_secs(60),
            upstream_block: Default::default(),
            sudo: false,
        };
        let hosts = vec![
            Host {
                name: "web-1".into(),
                address: "10.0.1.11".into(),
                ..Default::default()
            },
            Host {
                name: "web-2".into(),
                address: "fd00::12".into(),
                ..Default::default()
            },
        ];
        Nginx {
            config,
            hosts,
            app_port: 8080,
        }
    }

    #[test]
    fn render_marks_only_the_batch_down() {
        let text = nginx().render(&Pool::with_down(&["web-2".to_string()]));
        assert_eq!(
            text,
            "# Managed by roller: rewritten at every step of a rollout; edits here are lost.\n\
             upstream shop {\n    server 10.0.1.11:8080;  # web-1\n    server [fd00::12]:8080 down;  # web-2\n}\n"
        );
    }

    #[test]
    fn the_pool_is_read_back_from_the_file_it_renders() {
        let n = nginx();
        let text = n.render(&Pool::with_down(&["web-2".to_string()]));
        assert_eq!(n.parse_down(&text), BTreeSet::from(["web-2".to_string()]));
        assert!(n.parse_down(&n.render(&Pool::default())).is_empty());
        assert_eq!(n.parse_port(&text), Some(8080));
    }

    #[test]
    fn a_slot_port_and_canary_weights_render_and_read_back() {
        let n = nginx();
        let pool = Pool {
            down: BTreeSet::new(),
            port: Some(8082),
            weights: BTreeMap::from([("web-1".to_string(), 10)]),
        };
        let text = n.render(&pool);
        assert!(
            text.contains("server 10.0.1.11:8082 weight=10;  # web-1"),
            "{text}"
        );
        assert!(
            text.contains("server [fd00::12]:8082 weight=100;  # web-2"),
            "{text}"
        );
        assert_eq!(n.parse_port(&text), Some(8082));
        assert!(n.parse_down(&text).is_empty());
    }

    #[test]
    fn upstream_directives_and_server_parameters_survive_every_rewrite() {
        let mut n = nginx();
        n.config.upstream_block = crate::inventory::UpstreamBlock {
            zone: Some("64k".into()),
            balance: Some("least_conn".into()),
            keepalive: Some(16),
            keepalive_timeout: Some("30s".into()),
            keepalive_requests: Some(1000),
        };
        n.hosts[0].server = crate::inventory::ServerParams {
            max_fails: Some(3),
            fail_timeout: Some("10s".into()),
            max_conns: Some(200),
            backup: false,
        };
        n.hosts[1].server.backup = true;
        let head = "upstream shop {\n    zone shop 64k;\n    least_conn;\n    keepalive 16;\n    keepalive_timeout 30s;\n    keepalive_requests 1000;\n";
        let pools = [
            Pool::default(),
            Pool::with_down(&["web-1".to_string()]),
            Pool {
                down: BTreeSet::new(),
                port: Some(8082),
                weights: BTreeMap::from([("web-1".to_string(), 10)]),
            },
        ];
        for pool in &pools {
            let text = n.render(pool);
            assert!(text.contains(head), "{text}");
            assert!(
                text.contains(" max_fails=3 fail_timeout=10s max_conns=200"),
                "{text}"
            );
            assert!(text.contains(" backup"), "{text}");
            assert_eq!(n.parse_down(&text), pool.down, "{text}");
        }
        assert!(
            n.render(&pools[1]).contains(
                "server 10.0.1.11:8080 max_fails=3 fail_timeout=10s max_conns=200 down;  # web-1"
            ),
            "{}",
            n.render(&pools[1])
        );
        assert!(
            n.render(&pools[2]).contains(
                "server 10.0.1.11:8082 weight=10 max_fails=3 fail_timeout=10s max_conns=200;"
            ),
            "{}",
            n.render(&pools[2])
        );
        assert_eq!(n.parse_port(&n.render(&pools[2])), Some(8082));
    }

    #[test]
    fn in_flight_filter_is_one_quoted_argument() {
        let n = nginx();
        let hosts: Vec<&Host> = n.hosts.iter().collect();
        assert_eq!(
            n.in_flight_command(&hosts),
            "ss -Htn state established '( dst 10.0.1.11:8080 or dst [fd00::12]:8080 )' | wc -l; \
             m=$(cat /run/nginx.pid 2>/dev/null); \
             case \"$(tr '\\0' ' ' < \"/proc/${m:-0}/cmdline\" 2>/dev/null)\" in \"nginx: master process\"*) \
             ps -o args= --ppid \"$m\" | grep -c 'worker process is shutting down' || true ;; esac"
        );
    }
}
