//! A private nginx instance for the fleet's load-balancer host.
//!
//! Everything nginx writes lives under its `-p` prefix, so the same configuration runs as root
//! (CI containers) and as an ordinary developer, and never touches the system's
//! /var/log/nginx or /var/lib/nginx.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::proc::{self, shell_quote};

/// The upstream name in nginx.conf and the inventory.
pub const UPSTREAM: &str = "shop";
const START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Nginx {
    pub binary: PathBuf,
    /// The `-p` prefix; `nginx.conf` lives directly inside it.
    pub prefix: PathBuf,
}

impl Nginx {
    pub fn upstream_file(&self) -> PathBuf {
        self.prefix
            .join("conf.d")
            .join(format!("{UPSTREAM}-upstream.conf"))
    }

    pub fn pid_file(&self) -> PathBuf {
        self.prefix.join("nginx.pid")
    }

    pub fn access_log(&self) -> PathBuf {
        self.prefix.join("logs").join("access.log")
    }

    pub fn error_log(&self) -> PathBuf {
        self.prefix.join("logs").join("error.log")
    }

    /// `nginx -p <prefix> -c nginx.conf` plus `extra`, as shell text for the inventory.
    pub fn command(&self, extra: &str) -> String {
        format!(
            "{} -p {} -c nginx.conf {extra}",
            shell_quote(&self.binary),
            shell_quote(&self.prefix)
        )
    }

    pub fn test_command(&self) -> String {
        self.command("-t -q")
    }

    /// Tests first so that a broken upstream file is refused instead of signalled to a master
    /// that would then log the error and keep running the old configuration silently.
    pub fn reload_command(&self) -> String {
        format!("{} && {}", self.test_command(), self.command("-s reload"))
    }

    /// Writes nginx.conf, the upstream file and the directories nginx needs.
    pub fn write_config(&self, listen: &str, servers: &[String]) -> anyhow::Result<()> {
        for dir in ["conf.d", "logs", "temp"] {
            let dir = self.prefix.join(dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let temp = self.prefix.join("temp");
        // As root, workers would run as `nobody` and could not write temp files under a root
        // owned prefix (POST bodies go to client_body_temp); as anyone else nginx refuses to
        // switch users and warns about the directive, so it is emitted only for root.
        let user = if proc::is_root() { "user root;\n" } else { "" };
        // Two workers, as on any real load balancer: a reload then has a generation of old
        // workers that keep accepting for a moment, which is what roller must wait out.
        // `$msec $request_time` (when the request ended, and for how long it ran) let a test
        // tell when nginx sent a request to a server; roller's canary reads the first three.
        // HTTP/1.1 without `Connection: close` to the servers lets an inventory's upstream
        // `keepalive` pool connections, as production configurations do.
        let conf = format!(
            "# Written by roller-fleet: the load balancer of a local fleet.\n\
             {user}\
             daemon on;\n\
             worker_processes 2;\n\
             pid {pid};\n\
             error_log {error_log} notice;\n\
             \n\
             events {{\n    worker_connections 1024;\n}}\n\
             \n\
             http {{\n\
             \x20   log_format roller '$upstream_addr $status $upstream_response_time $request_method $request_uri $msec $request_time';\n\
             \x20   access_log {access_log} roller;\n\
             \x20   client_body_temp_path {t}/client_body;\n\
             \x20   proxy_temp_path {t}/proxy;\n\
             \x20   fastcgi_temp_path {t}/fastcgi;\n\
             \x20   uwsgi_temp_path {t}/uwsgi;\n\
             \x20   scgi_temp_path {t}/scgi;\n\
             \n\
             \x20   include {upstream_file};\n\
             \n\
             \x20   server {{\n\
             \x20       listen {listen};\n\
             \x20       location / {{\n\
             \x20           proxy_pass http://{UPSTREAM};\n\
             \x20           proxy_http_version 1.1;\n\
             \x20           proxy_set_header Connection \"\";\n\
             \x20       }}\n\
             \x20   }}\n\
             }}\n",
            pid = self.pid_file().display(),
            error_log = self.error_log().display(),
            access_log = self.access_log().display(),
            t = temp.display(),
            upstream_file = self.upstream_file().display(),
        );
        let path = self.prefix.join("nginx.conf");
        std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
        let upstream = self.upstream_file();
        std::fs::write(&upstream, upstream_text(UPSTREAM, servers))
            .with_context(|| format!("writing {}", upstream.display()))?;
        Ok(())
    }

    /// Starts nginx (it daemonizes itself) and waits until it accepts connections on
    /// `listen`. Returns the master PID from the pid file.
    pub fn start(&self, listen: &str) -> anyhow::Result<u32> {
        let _ = std::fs::remove_file(self.pid_file());
        let finished = proc::run(
            Command::new(&self.binary)
                .arg("-p")
                .arg(&self.prefix)
                .arg("-c")
                .arg("nginx.conf")
                // Only for messages before nginx.conf is read; otherwise a non-root nginx
                // complains that it cannot open the distribution's /var/log/nginx/error.log.
                .arg("-e")
                .arg(self.error_log())
                .current_dir(&self.prefix),
            START_TIMEOUT,
        )?;
        if !finished.status.success() {
            bail!(
                "nginx failed to start ({}): {}{}\n{}",
                finished.status,
                finished.stdout,
                finished.stderr,
                tail(&self.error_log(), 20)
            );
        }
        let deadline = Instant::now() + START_TIMEOUT;
        let addr: std::net::SocketAddr = listen.parse().context("nginx listen address")?;
        loop {
            if let Some(pid) = self.master_pid()
                && std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
            {
                return Ok(pid);
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx did not accept connections on {listen} within {START_TIMEOUT:?}\n{}",
                    tail(&self.error_log(), 20)
                );
            }
            std::thread::sleep(proc::POLL);
        }
    }

    pub fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops the master (fast shutdown) and makes sure no worker survives it.
    pub fn stop(&self, recorded_pid: Option<u32>) -> Vec<u32> {
        let mut pids: Vec<u32> = recorded_pid.into_iter().chain(self.master_pid()).collect();
        pids.sort_unstable();
        pids.dedup();
        let mut stopped = Vec::new();
        for master in pids {
            if !proc::belongs_to(master, &self.prefix) {
                continue;
            }
            let workers = proc::children(master);
            proc::terminate(master, Duration::from_secs(10));
            for worker in workers {
                proc::terminate(worker, Duration::from_secs(5));
                stopped.push(worker);
            }
            stopped.push(master);
        }
        stopped
    }
}

/// The upstream file in the format roller itself writes.
pub fn upstream_text(name: &str, servers: &[String]) -> String {
    let mut text = format!("# Managed by roller\nupstream {name} {{\n");
    for server in servers {
        text.push_str(&format!("    server {server};\n"));
    }
    text.push_str("}\n");
    text
}

/// The last `lines` lines of a log file, for error messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    format!(
        "--- {} (last {lines} lines) ---\n{}",
        path.display(),
        all[start..].join("\n")
    )
}
