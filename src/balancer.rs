//! Load-balancer drivers: how a pool change becomes a file, a reload and a drain check.
//!
//! The executor only knows [`Balancer`]; Nginx with a roller-owned upstream file is the one
//! driver today. Another (HAProxy, a cloud target group) would render its own commands.

use std::collections::{BTreeMap, BTreeSet};

use crate::inventory::{AppConfig, BalancerConfig, Host};
use crate::remote::quote;

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

/// How long a pool change waits for nginx's old workers to stop accepting, by the host's clock
/// (whole seconds, so 4 to 5), looking at its workers every `CONFIRM_POLL` seconds. nginx
/// swaps generations in about a tenth of a second; five seconds is for a load balancer that is
/// busy, and stays well below the lock's mutex wait, since on the lock host a pool change
/// holds that mutex while it runs.
const CONFIRM_WAIT_SECS: u32 = 5;
const CONFIRM_POLL: f64 = 0.02;

pub trait Balancer: Send + Sync {
    /// The configuration that puts exactly the hosts outside `pool.down` in rotation.
    fn render(&self, pool: &Pool) -> String;
    /// Reads the rendered configuration on stdin, installs it atomically, validates and
    /// reloads, restores the old file if validation fails, and exits 0 only once the new
    /// configuration is serving.
    fn apply_command(&self) -> String;
    /// Validates the live configuration without changing anything.
    fn test_command(&self) -> String;
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

    /// Shell text that sets `m` to the master's PID from `pid_file`, or prints why it cannot
    /// and runs the caller's text up to its closing `}`: any process can own a stale PID, so
    /// the process title must be nginx's master's.
    fn master_check(&self) -> String {
        format!(
            "m=$(cat {pid} 2>/dev/null); \
             case \"$(tr '\\0' ' ' < \"/proc/${{m:-0}}/cmdline\" 2>/dev/null)\" in \"nginx: master process\"*) ;; \
             *) printf 'no nginx master runs with the PID in %s (%s); check balancer.pid_file\\n' {pid} \"${{m:-no PID}}\" >&2; \
             false ;; esac || {{ ",
            pid = quote(&self.config.pid_file),
        )
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
        // A reload is applied only once nothing routes with the old pool: nginx starts a whole
        // new generation of workers, and only then tells the old ones to quit; until each old
        // worker has read that, it keeps accepting connections and sending them to the old
        // pool. An old worker calls itself "worker process is shutting down" from the moment it
        // closes its listening sockets, so the pool change holds once every worker from before
        // the reload has exited or says so, and as many new workers as there were old ones
        // accept. Cache manager and loader children are not workers and are left out.
        // A reload that never reached nginx restores the old file, so nothing is half-changed.
        // The file is replaced where it really lives (a symlink stays a symlink), by a rename
        // from a temporary file of this command's own (`mktemp`, so two writers never share
        // one) in the same directory, made with `cp -p` so it keeps the mode and, where
        // allowed, the owner; the old file stays reachable through a hard link until the
        // reload is confirmed. Few processes: this runs at every pool change.
        format!(
            "f={file}; if [ -L \"$f\" ]; then r=$(readlink -f -- \"$f\") && [ -n \"$r\" ] && f=$r; fi; \
             n=$(mktemp \"$f.roller-new.XXXXXX\") || exit 1; p=\"$n.prev\"; trap 'rm -f \"$n\" \"$p\"' EXIT; \
             if [ -e \"$f\" ]; then cp -p \"$f\" \"$n\" && ln -f \"$f\" \"$p\" || exit 1; else chmod 644 \"$n\"; fi; \
             cat > \"$n\" || exit 1; \
             mv -f \"$n\" \"$f\" || exit 1; \
             restore() {{ if [ -e \"$p\" ]; then mv -f \"$p\" \"$f\"; else rm -f \"$f\"; fi; }}; \
             {master}\
             restore; exit {rejected}; }}; \
             accepting() {{ ps -o pid=,args= --ppid \"$m\" | sed -n 's/^ *\\([0-9][0-9]*\\) nginx: worker process$/\\1/p'; }}; \
             old=\" $(echo $(accepting)) \"; want=$(echo $old | wc -w); [ \"$want\" -gt 0 ] || want=1; \
             if ! {{ {reload}; }}; then restore; \
             echo 'reload failed; the previous upstream file was restored' >&2; exit {rejected}; fi; \
             end=$(( $(date +%s) + {wait} )); \
             while :; do stale=; fresh=0; \
             for c in $(accepting); do case \"$old\" in *\" $c \"*) stale=\"$stale $c\" ;; *) fresh=$((fresh+1)) ;; esac; done; \
             [ -z \"$stale\" ] && [ $fresh -ge $want ] && exit 0; \
             [ \"$(date +%s)\" -ge \"$end\" ] && break; sleep {poll}; done; \
             if [ $fresh -eq 0 ] && [ \"$(echo $stale)\" = \"$(echo $old)\" ]; then restore; \
             echo \"nginx did not reload within {wait}s: its workers ($(echo $old)) still run the previous configuration; check that balancer.reload signals the master in \"{pid}\"; the previous upstream file was restored\" >&2; exit {rejected}; fi; \
             if [ -n \"$stale\" ]; then \
             echo \"nginx workers from before the reload ($(echo $stale)) still accept connections with the previous pool {wait}s after it; set worker_shutdown_timeout in nginx.conf so that old workers cannot outlive a reload\" >&2; \
             else echo \"only $fresh of $want new nginx workers were running {wait}s after the reload\" >&2; fi; \
             exit {unconfirmed}",
            file = quote(&self.config.upstream_file),
            master = self.master_check(),
            pid = quote(&self.config.pid_file),
            reload = self.config.reload,
            rejected = APPLY_REJECTED,
            unconfirmed = APPLY_UNCONFIRMED,
            poll = CONFIRM_POLL,
            wait = CONFIRM_WAIT_SECS,
        )
    }

    fn test_command(&self) -> String {
        format!(
            "{test} || exit 1; {master}exit 1; }}; \
             f={file}; if [ -L \"$f\" ]; then r=$(readlink -f -- \"$f\") && [ -n \"$r\" ] && f=$r; fi; d=$(dirname \"$f\"); test -w \"$d\" || {{ echo \"$d is not writable\" >&2; exit 1; }}; \
             cat \"$f\" 2>/dev/null; exit 0",
            test = self.config.test,
            master = self.master_check(),
            file = quote(&self.config.upstream_file),
        )
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
        let filter = hosts
            .iter()
            .map(|h| format!("dst {}", self.socket(h)))
            .collect::<Vec<_>>()
            .join(" or ");
        // A worker from before a reload calls itself "shutting down" until its last request
        // ends; the master's PID is checked like at every pool change, and where it cannot be
        // read the second line is left out, so the caller falls back to a quiet window.
        format!(
            "ss -Htn state established {} | wc -l; m=$(cat {pid} 2>/dev/null); \
             case \"$(tr '\\0' ' ' < \"/proc/${{m:-0}}/cmdline\" 2>/dev/null)\" in \"nginx: master process\"*) \
             ps -o args= --ppid \"$m\" | grep -c 'worker process is shutting down' || true ;; esac",
            quote(&format!("( {filter} )")),
            pid = quote(&self.config.pid_file),
        )
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
