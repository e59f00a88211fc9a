//! How a step ends: done (perhaps with a note, or skipped), or failed for a reason the
//! executor can tell apart: interrupted, timed out, lost connection, refused, a command that
//! failed with its status, or something the step could not accept.

use std::time::Duration;

use crate::error::HostFailure;
use crate::plan::{PhaseName, Role};
use crate::transport::{ExecOutput, Transport, TransportError};

pub(super) enum StepDone {
    Done,
    /// Done, with something the operator should read (a canary verdict).
    Noted(String),
    Skipped(String),
}

/// Why a step failed. Displayed, it is the message the report and the events carry.
#[derive(Debug)]
pub(super) enum StepError {
    /// The rollout was interrupted while the step waited.
    Interrupted(String),
    /// The host gave no answer within the step's deadline.
    Timeout(TransportError),
    /// The connection dropped and could not be re-established.
    LostConnection(TransportError),
    /// The host or the deploy lock refused: host key, authentication, a lost lease.
    Refused(TransportError),
    /// The command ran and failed; no status means it was killed or its channel closed.
    CommandFailed { status: Option<u32>, stderr: String },
    /// The step got an answer it cannot accept: a drain that never ended, an unhealthy host,
    /// a canary judged bad, output that makes no sense.
    Rejected(String),
}

impl StepError {
    pub fn interrupted(reason: String) -> StepError {
        StepError::Interrupted(reason)
    }

    pub fn is_interrupt(&self) -> bool {
        matches!(self, StepError::Interrupted(_))
    }

    /// A command that exited unsuccessfully.
    pub fn failed(out: &ExecOutput) -> StepError {
        StepError::CommandFailed {
            status: out.status,
            stderr: out.stderr_text(),
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Interrupted(reason) => write!(f, "interrupted ({reason})"),
            StepError::Timeout(e) | StepError::LostConnection(e) | StepError::Refused(e) => {
                write!(f, "{e}")
            }
            StepError::CommandFailed { status, stderr } => {
                match status {
                    Some(code) => write!(f, "exit status {code}")?,
                    None => f.write_str("killed or disconnected")?,
                }
                if stderr.is_empty() {
                    Ok(())
                } else {
                    write!(f, ": {stderr}")
                }
            }
            StepError::Rejected(message) => f.write_str(message),
        }
    }
}

impl From<TransportError> for StepError {
    fn from(e: TransportError) -> StepError {
        match e {
            TransportError::Timeout(_) => StepError::Timeout(e),
            TransportError::Connect(_)
            | TransportError::Disconnected(_)
            | TransportError::Channel(_) => StepError::LostConnection(e),
            TransportError::ForwardingRefused { .. } => StepError::Refused(e),
            TransportError::HostKeyUnknown { .. }
            | TransportError::HostKeyChanged { .. }
            | TransportError::HostKeyRevoked { .. }
            | TransportError::Auth { .. }
            | TransportError::Fenced(_) => StepError::Refused(e),
        }
    }
}

impl From<String> for StepError {
    fn from(message: String) -> StepError {
        StepError::Rejected(message)
    }
}

impl From<&str> for StepError {
    fn from(message: &str) -> StepError {
        StepError::Rejected(message.to_string())
    }
}

/// A failed step, before it is attributed to a batch.
#[derive(Debug)]
pub(super) struct StepFailure {
    pub target: String,
    pub phase: PhaseName,
    pub message: String,
    pub role: Role,
    pub interrupted: bool,
}

pub(super) fn to_host_failure(f: StepFailure) -> HostFailure {
    HostFailure {
        host: f.target,
        step: f.phase.to_string(),
        message: f.message,
    }
}

/// Runs a command that must succeed and returns its stdout.
pub(super) async fn run(
    session: &dyn Transport,
    command: &str,
    stdin: Option<bytes::Bytes>,
    deadline: Duration,
) -> Result<String, StepError> {
    let out = session.exec(command, stdin, deadline).await?;
    if out.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(StepError::failed(&out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_are_told_apart_and_read_as_before() {
        let timeout = StepError::from(TransportError::Timeout(Duration::from_secs(3)));
        assert!(matches!(timeout, StepError::Timeout(_)));
        assert_eq!(timeout.to_string(), "timed out after 3s");
        let lost = StepError::from(TransportError::Disconnected("reset".into()));
        assert!(matches!(lost, StepError::LostConnection(_)));
        let fenced = StepError::from(TransportError::Fenced("lease lost".into()));
        assert!(matches!(fenced, StepError::Refused(_)));
        assert!(!fenced.is_interrupt());
        assert!(StepError::interrupted("SIGINT".into()).is_interrupt());
    }

    #[test]
    fn a_failed_command_reads_as_its_status_and_stderr() {
        let out = |status, stderr: &str| ExecOutput {
            status,
            stdout: Vec::new(),
            stderr: stderr.as_bytes().to_vec(),
        };
        assert_eq!(
            StepError::failed(&out(Some(3), "no space")).to_string(),
            "exit status 3: no space"
        );
        assert_eq!(
            StepError::failed(&out(None, "")).to_string(),
            "killed or disconnected"
        );
    }
}
