//! The one error type of the library: every failure names the file, key path, host or step it
//! concerns, so `main` can map it to an exit code and the operator can act on it.

use std::path::PathBuf;

/// One problem in the inventory, located by its key path (`hosts[1].name`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// A host that could not be used, and at which step that was found out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostFailure {
    pub host: String,
    pub step: String,
    pub message: String,
}

impl std::fmt::Display for HostFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}]: {}", self.host, self.step, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read inventory {}: {source}", file.display())]
    InventoryRead {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid inventory {}:\n{}", file.display(), list(problems))]
    Inventory {
        file: PathBuf,
        problems: Vec<Problem>,
    },
    #[error("{flag}: {message}")]
    Usage { flag: String, message: String },
    #[error("artifact {}: {message}", path.display())]
    Artifact { path: PathBuf, message: String },
    #[error("pre-flight failed, nothing was changed:\n{}", list(failures))]
    Preflight { failures: Vec<HostFailure> },
    /// Another rollout holds the deploy lock.
    #[error("{0}")]
    Locked(String),
    /// A previous rollout left work behind that must be finished or undone first, or there is
    /// nothing to resume.
    #[error("{0}")]
    Unfinished(String),
    /// Host discovery found nothing, or a value that is not a host: bad input, nothing was
    /// contacted over SSH.
    #[error("host discovery: {0}")]
    Discovery(String),
    /// The discovery API could not be asked (no CLI, no credentials, no answer).
    #[error("host discovery failed: {0}")]
    DiscoveryFailed(String),
    /// Talking to the load balancer about the lock or the rollout state failed.
    #[error("{0}")]
    State(String),
    /// `roller switch-back` (or `recover` of a blue-green release) found the slot it would
    /// send traffic to silent on some hosts, and changed nothing.
    #[error(
        "switch-back refused: {slot} does not answer on {} (stopped after keep_old, or down); traffic stays on {live}",
        hosts.join(", ")
    )]
    SwitchBackRefused {
        slot: String,
        live: String,
        hosts: Vec<String>,
    },
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|item| format!("  - {item}"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
