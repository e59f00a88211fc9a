//! The boundary between roller and a host: run a command, stream bytes to it, reach a port on it.
//!
//! Everything roller does to a host goes through [`Transport`], so the executor can run over
//! real SSH in production and over an in-memory fake in unit tests.

pub mod memory;
pub mod reconnect;
pub mod ssh;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

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

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim_end().to_string()
    }
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
}

/// An open, authenticated session to one host. Implementations multiplex concurrent calls over
/// one connection and bound how many channels are open at once.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Runs `command` with the remote `/bin/sh -c` semantics of an SSH exec request. `stdin`,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Inventory name, used in every message.
    pub name: String,
    pub address: String,
    pub port: u16,
}

/// Opens sessions. One call per host per rollout: the session is kept for the whole rollout.
#[async_trait]
pub trait Connector: Send + Sync {
    async fn connect(&self, endpoint: &Endpoint) -> Result<Arc<dyn Transport>, TransportError>;
}
