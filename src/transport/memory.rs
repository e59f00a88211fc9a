//! An in-memory transport for unit tests of the executor: every host is answered by one
//! scripted function, and every call is recorded in order, so tests can assert what roller
//! would have run without a real server adding anything.
//!
//! Compiled only with the `testing` feature, which roller's own tests turn on through their
//! dev-dependency on the crate: the release binary carries no fake transport.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Connector, Endpoint, ExecOutput, Transport, TransportError};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Exec {
        target: String,
        command: String,
        stdin: Option<Bytes>,
    },
    HttpGet {
        target: String,
        address: String,
        port: u16,
        path: String,
    },
}

type ExecFn =
    dyn Fn(&str, &str, Option<&Bytes>) -> Result<ExecOutput, TransportError> + Send + Sync;
type HttpFn = dyn Fn(&str, &str, u16, &str) -> Result<u16, TransportError> + Send + Sync;

/// A fleet of fake hosts. `exec` answers `(target, command, stdin)`, `http` answers
/// `(target, address, port, path)`.
#[derive(Clone)]
pub struct MemoryFleet {
    exec: Arc<ExecFn>,
    http: Arc<HttpFn>,
    refused: Arc<HashMap<String, TransportError>>,
    pub calls: Arc<Mutex<Vec<Call>>>,
}

impl MemoryFleet {
    pub fn new(
        exec: impl Fn(&str, &str, Option<&Bytes>) -> Result<ExecOutput, TransportError>
        + Send
        + Sync
        + 'static,
        http: impl Fn(&str, &str, u16, &str) -> Result<u16, TransportError> + Send + Sync + 'static,
    ) -> MemoryFleet {
        MemoryFleet {
            exec: Arc::new(exec),
            http: Arc::new(http),
            refused: Arc::new(HashMap::new()),
            calls: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Makes `connect` to `target` fail with `error`.
    pub fn refuse(mut self, target: &str, error: TransportError) -> MemoryFleet {
        Arc::make_mut(&mut self.refused).insert(target.to_string(), error);
        self
    }

    /// The scripted answer to a command, without recording a call: for wrapping one fleet's
    /// script in another's.
    pub fn answer(
        &self,
        target: &str,
        command: &str,
        stdin: Option<&Bytes>,
    ) -> Result<ExecOutput, TransportError> {
        (self.exec)(target, command, stdin)
    }

    /// The scripted answer to an HTTP probe, without recording a call.
    pub fn probe(
        &self,
        target: &str,
        address: &str,
        port: u16,
        path: &str,
    ) -> Result<u16, TransportError> {
        (self.http)(target, address, port, path)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls lock").clone()
    }

    /// The commands run on `target`, in order.
    pub fn commands(&self, target: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Exec {
                    target: t, command, ..
                } if t == target => Some(command),
                _ => None,
            })
            .collect()
    }
}

/// Output helper for scripted answers.
pub fn ok(stdout: &str) -> Result<ExecOutput, TransportError> {
    Ok(ExecOutput {
        status: Some(0),
        stdout: stdout.as_bytes().to_vec(),
        stderr: Vec::new(),
    })
}

/// A failed command with `status` and `stderr`.
pub fn fail(status: u32, stderr: &str) -> Result<ExecOutput, TransportError> {
    Ok(ExecOutput {
        status: Some(status),
        stdout: Vec::new(),
        stderr: stderr.as_bytes().to_vec(),
    })
}

struct MemorySession {
    target: String,
    fleet: MemoryFleet,
}

#[async_trait]
impl Transport for MemorySession {
    async fn exec(
        &self,
        command: &str,
        stdin: Option<Bytes>,
        _deadline: Duration,
    ) -> Result<ExecOutput, TransportError> {
        self.fleet
            .calls
            .lock()
            .expect("calls lock")
            .push(Call::Exec {
                target: self.target.clone(),
                command: command.to_string(),
                stdin: stdin.clone(),
            });
        (self.fleet.exec)(&self.target, command, stdin.as_ref())
    }

    async fn http_get(
        &self,
        address: &str,
        port: u16,
        path: &str,
        _deadline: Duration,
    ) -> Result<u16, TransportError> {
        self.fleet
            .calls
            .lock()
            .expect("calls lock")
            .push(Call::HttpGet {
                target: self.target.clone(),
                address: address.to_string(),
                port,
                path: path.to_string(),
            });
        (self.fleet.http)(&self.target, address, port, path)
    }

    async fn close(&self) {}
}

#[async_trait]
impl Connector for MemoryFleet {
    async fn connect(&self, endpoint: &Endpoint) -> Result<Arc<dyn Transport>, TransportError> {
        if let Some(e) = self.refused.get(&endpoint.name) {
            return Err(e.clone());
        }
        Ok(Arc::new(MemorySession {
            target: endpoint.name.clone(),
            fleet: self.clone(),
        }))
    }
}
