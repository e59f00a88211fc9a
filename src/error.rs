//! The one error type of the library: every failure names the file, key path, host or step it
//! concerns, so `main` can map it to an exit code and the operator can act on it.

use std::path::PathBuf;

use crate::inventory::Slot;
use crate::journal::Status;
use crate::lock::LockError;
use crate::remote::sudo::{self, Refusal};
use crate::transport::TransportError;

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

/// A host whose inventory side says `sudo = true` (`key`), where sudo did not run roller's
/// probe as root: nothing was changed anywhere.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SudoRefused {
    pub host: String,
    /// The SSH user sudo was asked for.
    pub user: String,
    /// `app.sudo` or `balancer.sudo`.
    pub key: String,
    pub refusal: Refusal,
    /// What sudo printed.
    pub stderr: String,
    /// The sudoers rule that lets `user` run roller's commands.
    pub rule: String,
}

impl SudoRefused {
    /// What happened and what to do, without the host: for lists that name it already.
    pub fn reason(&self) -> String {
        let said = if self.stderr.is_empty() {
            String::new()
        } else {
            format!(" (sudo said: {})", self.stderr.replace('\n', " "))
        };
        format!(
            "{}{said}. With {} = true every command there runs as `sudo -n {} -c '<command>'`: {}, or set {} = false",
            self.refusal.describe(&self.user),
            self.key,
            sudo::SHELL,
            self.refusal.fix(&self.user),
            self.key,
        )
    }
}

impl std::fmt::Display for SudoRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [sudo]: {}", self.host, self.reason())
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
    /// The ssh config file the inventory names (`ssh.config`) cannot be used: missing,
    /// unparsable, or saying what roller cannot honour for a host. Found before any connection.
    #[error("ssh config {}: {message}", file.display())]
    SshConfig { file: PathBuf, message: String },
    #[error("artifact {}: {message}", path.display())]
    Artifact { path: PathBuf, message: String },
    #[error("pre-flight failed, nothing was changed:\n{}", list(failures))]
    Preflight { failures: Vec<HostFailure> },
    /// Ctrl-C, SIGTERM or a lost lease came while roller was still connecting or checking:
    /// nothing had changed on any host, so there was nothing to finish before stopping.
    #[error("stopped ({reason}) before anything changed on any host")]
    Interrupted { reason: String },
    /// sudo would not run roller's commands as root on these hosts; found before the deploy
    /// lock is taken, so nothing was changed.
    #[error(
        "pre-flight failed, nothing was changed: sudo does not run roller's commands as root on {}:\n{}",
        refusals.iter().map(|r| r.host.as_str()).collect::<Vec<_>>().join(", "),
        list(refusals)
    )]
    Sudo { refusals: Vec<SudoRefused> },
    /// Another rollout holds the deploy lock, or this controller lost it.
    #[error("{0}")]
    Locked(Box<Locked>),
    /// A previous rollout left work behind that must be finished or undone first, or there is
    /// nothing to resume.
    #[error("{0}")]
    Unfinished(Box<Unfinished>),
    /// Host discovery found nothing, or a value that is not a host: bad input, nothing was
    /// contacted over SSH.
    #[error("host discovery: {0}")]
    Discovery(String),
    /// The discovery API could not be asked (no CLI, no credentials, no answer).
    #[error("host discovery failed: {0}")]
    DiscoveryFailed(String),
    /// Reading or writing the lock, the rollout state or the journal failed.
    #[error("{0}")]
    State(Box<StateError>),
    /// `roller switch-back` (or `recover` of a blue-green release) found the slot it would
    /// send traffic to silent on some hosts, and changed nothing.
    #[error(
        "switch-back refused: {} does not answer on {} (stopped after keep_old, or down); traffic stays on {}",
        slot.as_str(), hosts.join(", "), live.as_str()
    )]
    SwitchBackRefused {
        slot: Slot,
        live: Slot,
        hosts: Vec<String>,
    },
    /// A controller-side hook that may stop the run (`hooks.before_rollout`) failed: nothing
    /// changed.
    #[error("hooks.{hook} failed, so nothing was changed: {message}")]
    Hook { hook: String, message: String },
}

/// Why this controller does not hold the deploy lock.
#[derive(Debug, thiserror::Error)]
pub enum Locked {
    /// Another controller holds it (perhaps with another inventory's load balancers).
    #[error(transparent)]
    Held(LockError),
    /// The lease was lost while the rollout ran; every command after that was fenced out.
    #[error(
        "{reason}; every command after that was refused, so this controller changed nothing more. \
         Whoever holds the lock now finishes the rollout; see `{resume_hint}`"
    )]
    Lost { reason: String, resume_hint: String },
}

/// What an earlier rollout, or the lack of one, stands in the way of.
#[derive(Debug, thiserror::Error)]
pub enum Unfinished {
    #[error("no rollout of {app} is recorded on {lock_host}: nothing to {verb}")]
    NoneRecorded {
        app: String,
        lock_host: String,
        /// `resume` or `recover`.
        verb: &'static str,
    },
    #[error("journal {} holds no rollout state", journal.display())]
    EmptyJournal { journal: PathBuf },
    #[error("rollout {id} of {release} already ended ({status:?}): nothing to {verb}")]
    AlreadyEnded {
        id: String,
        release: String,
        status: Status,
        verb: &'static str,
    },
    #[error(
        "rollout {id} of {release} was run with the load balancers [{}], this inventory names [{}]: \
         finish it with the inventory it was started with",
        theirs.join(", "), ours.join(", ")
    )]
    OtherBalancers {
        id: String,
        release: String,
        theirs: Vec<String>,
        ours: Vec<String>,
    },
    #[error(
        "rollout {id} of {release} is unfinished ({status:?}); finish it with `{resume_hint}` or undo it with `{recover_hint}` first"
    )]
    InTheWay {
        id: String,
        release: String,
        status: Status,
        resume_hint: String,
        recover_hint: String,
    },
    #[error(
        "rollout {id} of {release} recorded no live slot, so roller cannot tell where traffic was before it; traffic is on {}: run `{switch_back_hint}` to move it to {}",
        live.as_str(), live.other().as_str()
    )]
    NoLiveSlot {
        id: String,
        release: String,
        live: Slot,
        switch_back_hint: String,
    },
    #[error("no rollout of {app} is running: nothing to {decision}")]
    NotRunning {
        app: String,
        /// `promote` or `abort`.
        decision: &'static str,
    },
}

/// A file roller keeps about a rollout could not be read, written or trusted.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Taking, releasing or removing the lock failed for another reason than a holder.
    #[error(transparent)]
    Lock(LockError),
    /// The lock host did not answer the read, or the read failed there.
    #[error("cannot read the rollout state: {reason}")]
    Read { reason: String },
    /// The state file is not JSON roller can read; `file` is `host:path`.
    #[error("the rollout state {file} is unreadable: {reason}")]
    Unreadable { file: String, reason: String },
    /// The state file reads, but values in it break the rules roller writes it by.
    #[error(
        "refusing the rollout state {file}: it was not written by roller as it stands, nothing was done:\n{}\n\
         inspect the file, and put the fleet in order by hand if it was tampered with",
        list(problems)
    )]
    Refused { file: String, problems: Vec<String> },
    #[error("cannot read journal {}: {source}", path.display())]
    JournalRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the journal in {}: {source}", dir.display())]
    JournalWrite {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The inventory discovers its hosts, but the rollout to finish recorded none.
    #[error(
        "rollout {id} records no hosts, but the inventory finds its hosts through [discovery]: it was started with [[hosts]]; list them again to finish it"
    )]
    NoRecordedHosts { id: String },
    /// Word for a paused canary could not be left on the lock host.
    #[error("{0}")]
    Decision(TransportError),
    #[error("cannot write {file}: {stderr}")]
    DecisionRefused { file: String, stderr: String },
}

// Boxed in `Error`, which every fallible call returns: the structure is worth keeping, not
// worth a large `Result` on every path.
impl From<Locked> for Error {
    fn from(e: Locked) -> Error {
        Error::Locked(Box::new(e))
    }
}

impl From<Unfinished> for Error {
    fn from(e: Unfinished) -> Error {
        Error::Unfinished(Box::new(e))
    }
}

impl From<StateError> for Error {
    fn from(e: StateError) -> Error {
        Error::State(Box::new(e))
    }
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|item| format!("  - {item}"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
