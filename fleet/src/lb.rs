//! The load-balancer host as the tests watch it: nginx's upstream file (what roller wrote),
//! its access log (where requests really went) and its error log (how often it reloaded).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::fleet::Fleet;
use crate::nginx::{self, Nginx};
use crate::proc;

impl Fleet {
    pub fn lb_url(&self) -> String {
        format!("http://{}", self.lb_authority())
    }

    pub(crate) fn lb_authority(&self) -> String {
        format!("{}:{}", self.state.lb.address, self.state.spec.lb_port)
    }

    pub fn upstream_file(&self) -> PathBuf {
        self.nginx().upstream_file()
    }

    /// The LB's nginx (binary and prefix), for tools that drive it the way roller does, such
    /// as the bench's OpenSSH baseline.
    pub fn lb_nginx(&self) -> Nginx {
        self.nginx()
    }

    /// The LB's upstream file as it is on disk now.
    pub fn upstream_text(&self) -> String {
        std::fs::read_to_string(self.upstream_file()).unwrap_or_default()
    }

    /// nginx's access log (format `roller`: upstream, status, upstream time, method, URI,
    /// `$msec`, `$request_time`).
    pub fn access_log_path(&self) -> PathBuf {
        self.nginx().access_log()
    }

    /// How many times the nginx master was told to reload, from its error log (`notice`
    /// level logs each SIGHUP it receives).
    pub fn nginx_reloads(&self) -> usize {
        std::fs::read_to_string(self.nginx().error_log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("(SIGHUP) received"))
            .count()
    }

    /// The upstream address (`address:port`) of every access-log line from byte `from` on,
    /// with the line's status: who nginx really sent each request to.
    pub fn served_since(&self, from: u64) -> Vec<(String, u16)> {
        let text = std::fs::read(self.access_log_path()).unwrap_or_default();
        let from = usize::try_from(from).unwrap_or(usize::MAX).min(text.len());
        String::from_utf8_lossy(&text[from..])
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let upstream = fields.next()?.to_string();
                let status = fields.next()?.parse().ok()?;
                Some((upstream, status))
            })
            .collect()
    }

    /// The access log's length now, to read what comes after with [`Fleet::served_since`].
    pub fn access_log_len(&self) -> u64 {
        std::fs::metadata(self.access_log_path()).map_or(0, |m| m.len())
    }

    /// The nginx master, from its pid file.
    pub fn nginx_pid(&self) -> Option<u32> {
        self.nginx()
            .master_pid()
            .filter(|&pid| proc::belongs_to(pid, &self.nginx().prefix))
    }

    pub(crate) fn wait_lb_serving(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = crate::http::get(&self.lb_authority(), "/", Duration::from_secs(3));
            if matches!(&last, Ok(r) if r.status == 200) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx at {} did not serve 200 within {timeout:?} (last: {:?})\n{}",
                    self.lb_url(),
                    last.map(|r| r.status),
                    nginx::tail(&self.nginx().error_log(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn nginx(&self) -> Nginx {
        Nginx {
            binary: self.state.nginx.clone(),
            prefix: self.state.lb.dir.join("nginx"),
        }
    }
}

/// The (address, port) of every `server` line, in the format roller writes
/// (`server 10.0.1.11:8081 weight=10 down;  # web-1`); a port that does not parse is 0.
pub(crate) fn upstream_servers(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .filter_map(|l| l.split(';').next()?.split_whitespace().next())
        .filter_map(|socket| {
            let (address, port) = socket.rsplit_once(':')?;
            let address = address.trim_start_matches('[').trim_end_matches(']');
            Some((address.to_string(), port.parse().unwrap_or(0)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_servers_reads_roller_s_format() {
        let text = "# Managed by roller\nupstream shop {\n\
                    \x20   server 10.0.1.11:8081;  # web-1\n\
                    \x20   server [fd00::12]:8082 weight=10 down;  # web-2\n\
                    \x20   server 10.0.1.13:x;\n}\n";
        assert_eq!(
            upstream_servers(text),
            [
                ("10.0.1.11".to_string(), 8081),
                ("fd00::12".to_string(), 8082),
                ("10.0.1.13".to_string(), 0),
            ]
        );
    }
}
