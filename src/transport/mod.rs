//! The boundary between roller and a host: run a command, stream bytes to it, reach a port on it.
//!
//! Everything roller does to a host goes through [`Transport`], so the executor can run over
//! real SSH in production and over an in-memory fake in unit tests.

#[cfg(feature = "testing")]
pub mod memory;
pub mod reach;
pub mod reconnect;
pub mod sessions;
pub mod ssh;
pub mod sudo;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// The exact string an SSH exec request carries for `command`: `exec sh -c '<command>'`.
///
/// sshd hands the request to the user's login shell (`$SHELL -c`), and login shells differ in
/// ways that matter: bash keeps a backgrounded `a && b &` list attached to the channel where
/// dash does not, and fish and csh are not POSIX at all. Every roller command is written for
/// POSIX `sh`, so it runs in one, and the login shell only ever parses this one line. The
/// quoting is read the same way by sh, bash, dash, zsh, fish and csh/tcsh: single-quoted runs
/// that contain no `'`, `\` or `!`, each of which is backslash-escaped outside the quotes (csh
/// expands `!` and fish unescapes `\` even inside single quotes). csh also refuses a newline
/// inside quotes; roller's commands are single lines.
pub fn posix_sh(command: &str) -> String {
    let mut quoted = String::with_capacity(command.len() + 16);
    let mut open = false;
    for c in command.chars() {
        if matches!(c, '\'' | '\\' | '!') {
            if open {
                quoted.push('\'');
                open = false;
            }
            quoted.push('\\');
            quoted.push(c);
        } else {
            if !open {
                quoted.push('\'');
                open = true;
            }
            quoted.push(c);
        }
    }
    if open {
        quoted.push('\'');
    }
    if quoted.is_empty() {
        quoted.push_str("''");
    }
    format!("exec sh -c {quoted}")
}

/// What a finished remote command left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status; `None` when the command was killed by a signal or the channel closed without one.
    pub status: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim_end().to_string()
    }

    /// For messages: a host's stderr reaches the operator's terminal, so control characters
    /// (escape sequences that could rewrite the screen) are shown escaped.
    pub fn stderr_text(&self) -> String {
        printable(String::from_utf8_lossy(&self.stderr).trim_end())
    }
}

/// `text` with every control character but newline and tab escaped (`\u{1b}`), so that text
/// from a host cannot drive the terminal it is printed on.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Why talking to a host failed. Host-key problems are separate variants because they are
/// refusals by policy, not faults, and must never be retried.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    #[error(
        "host key for {host} is not in {known_hosts} ({fingerprint}); add it after verifying it out of band"
    )]
    HostKeyUnknown {
        host: String,
        fingerprint: String,
        known_hosts: String,
    },
    #[error(
        "host key for {host} does not match {known_hosts} line {line} ({fingerprint}): possible man-in-the-middle, refusing to connect"
    )]
    HostKeyChanged {
        host: String,
        fingerprint: String,
        known_hosts: String,
        line: usize,
    },
    #[error(
        "host key for {host} is revoked in {known_hosts} line {line} ({fingerprint}): refusing to connect"
    )]
    HostKeyRevoked {
        host: String,
        fingerprint: String,
        known_hosts: String,
        line: usize,
    },
    #[error("authentication as {user} failed: {detail}")]
    Auth { user: String, detail: String },
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("channel failed: {0}")]
    Channel(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The deploy lock's lease is no longer provably ours: nothing may be sent.
    #[error("{0}")]
    Fenced(String),
    /// The host's sshd refuses port forwarding (`AllowTcpForwarding no`, as CIS-hardened images
    /// set it): nothing behind it can be reached through the connection, only commands run.
    #[error(
        "{host}: sshd refuses port forwarding (administratively prohibited: AllowTcpForwarding no or PermitOpen), so {target} cannot be reached through it"
    )]
    ForwardingRefused { host: String, target: String },
}

/// An open, authenticated session to one host. Implementations multiplex concurrent calls over
/// one connection and bound how many channels are open at once.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Runs `command` under the host's POSIX `sh`, whatever the login shell (see [`posix_sh`]). `stdin`,
    /// when given, is streamed to the command and then closed. Fails with `Timeout` past
    /// `deadline`, even if the remote side stops reading.
    async fn exec(
        &self,
        command: &str,
        stdin: Option<Bytes>,
        deadline: Duration,
    ) -> Result<ExecOutput, TransportError>;

    /// Opens a TCP connection *from the host* to `address:port` (an SSH direct-tcpip channel),
    /// sends `GET path HTTP/1.1` with `Connection: close`, and returns the response status code.
    async fn http_get(
        &self,
        address: &str,
        port: u16,
        path: &str,
        deadline: Duration,
    ) -> Result<u16, TransportError>;

    /// Closes the session; later calls fail with `Disconnected`.
    async fn close(&self);
}

/// Where and how to reach one host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Inventory name, used in every message.
    pub name: String,
    pub address: String,
    pub port: u16,
    /// The login name, when it is not the connector's default.
    pub user: Option<String>,
    /// The private key for this host, when it is not the connector's.
    pub identity: Option<std::path::PathBuf>,
    /// The bastions this host is reached through, when they are not the connector's;
    /// `Some(vec![])` reaches it directly.
    pub proxy_jump: Option<Vec<ssh::Hop>>,
}

/// Opens sessions. One call per host per rollout: the session is kept for the whole rollout.
#[async_trait]
pub trait Connector: Send + Sync {
    async fn connect(&self, endpoint: &Endpoint) -> Result<Arc<dyn Transport>, TransportError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posix_sh_quotes_once_and_escapes_what_any_shell_would_touch() {
        assert_eq!(posix_sh("true"), "exec sh -c 'true'");
        assert_eq!(posix_sh(""), "exec sh -c ''");
        assert_eq!(
            posix_sh(r#"printf '%s\n' "$x" && [ ! -d a ]"#),
            r#"exec sh -c 'printf '\''%s'\\'n'\'' "$x" && [ '\!' -d a ]'"#
        );
    }

    /// The same bytes through every login shell installed here: each must run the command
    /// under sh, with its output and exit status intact. bash, dash and zsh are required (CI
    /// installs them); fish and tcsh are checked where present.
    #[test]
    fn posix_sh_means_the_same_under_every_login_shell() {
        let command = r#"printf '%s|' "it's" 'a\b' '!x' "a!=b" '$HOME' "${0##*/}"; [ ! -d /nonexistent ] && echo ok; exit 3"#;
        let expected = "it's|a\\b|!x|a!=b|$HOME|sh|ok\n";
        let wrapped = posix_sh(command);
        let mut ran = Vec::new();
        for shell in ["bash", "dash", "zsh", "fish", "tcsh"] {
            let output = match std::process::Command::new(shell)
                .arg("-c")
                .arg(&wrapped)
                .env_remove("ENV")
                .output()
            {
                Ok(output) => output,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    assert!(
                        !matches!(shell, "bash" | "dash" | "zsh"),
                        "{shell} is not installed"
                    );
                    continue;
                }
                Err(e) => panic!("running {shell}: {e}"),
            };
            assert_eq!(
                (
                    output.status.code(),
                    String::from_utf8_lossy(&output.stdout).into_owned(),
                    String::from_utf8_lossy(&output.stderr).into_owned()
                ),
                (Some(3), expected.to_string(), String::new()),
                "under {shell}: {wrapped}"
            );
            ran.push(shell);
        }
        assert!(ran.len() >= 3, "{ran:?}");
    }

    #[test]
    fn text_from_a_host_cannot_drive_the_terminal() {
        let out = ExecOutput {
            status: Some(1),
            stdout: vec![],
            stderr: b"\x1b]0;owned\x07line one\r\n\tline two\x1b[2J\n".to_vec(),
        };
        assert_eq!(
            out.stderr_text(),
            "\\u{1b}]0;owned\\u{7}line one\\r\n\tline two\\u{1b}[2J"
        );
    }
}
