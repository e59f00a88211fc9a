//! The use cases behind the command line, one module per command, so that the binary only
//! parses flags, picks an output and maps outcomes to exit codes.
//!
//! Every command that changes the fleet goes through [`deploy::run`] under a
//! [`crate::session`]: a rollout, a resumed rollout, a recovery and a switch-back differ only in
//! what they ask of it. Commands that only read or leave word on the lock host (`unlock`,
//! `promote`, `abort`) connect to it alone. A new command (status, history, rollback, check)
//! gets a module of its own here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result, StateError};
use crate::inventory::Inventory;
use crate::journal::{self, Journal, RolloutState};
use crate::report::{Reporter, RolloutReport};
use crate::transport::Transport;

pub mod canary_decision;
pub mod check;
pub mod deploy;
pub mod history;
pub mod lock_view;
pub mod plan;
pub mod resume;
pub mod rollback;
pub mod rollout;
pub mod status;
pub mod switch_back;
pub mod unlock;

/// The command lines that finish or undo a rollout, as the operator is told them in reports
/// and refusals: they name the inventory this run was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hints {
    pub resume: String,
    pub recover: String,
    pub switch_back: String,
}

impl Hints {
    pub fn for_inventory(path: &Path) -> Hints {
        let inv = path.display();
        Hints {
            resume: format!("roller resume --inventory {inv}"),
            recover: format!("roller recover --inventory {inv}"),
            switch_back: format!("roller switch-back --inventory {inv}"),
        }
    }
}

/// How a command that takes the deploy lock waits for it and where it keeps its journal.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Wait this long for another holder of the lock instead of failing at once.
    pub lock_wait: Option<Duration>,
    /// Where the local journal goes; `None` for [`Journal::default_dir`].
    pub journal_dir: Option<PathBuf>,
}

impl Control {
    pub fn journal_dir(&self) -> PathBuf {
        self.journal_dir
            .clone()
            .unwrap_or_else(Journal::default_dir)
    }
}

/// Builds the reporter that shows a run to whoever started it. Called once the run holds the
/// lock and reaches pre-flight, not before: a terminal's progress lines appear only then.
pub type Display<'a> = &'a dyn Fn(&Inventory) -> Arc<dyn Reporter>;

/// A run that went as far as the executor: its report, whatever the outcome, and where its
/// journal is.
#[derive(Debug)]
pub struct Finished {
    pub report: RolloutReport,
    pub journal: PathBuf,
}

/// The rollout state on the lock host, checked before anything acts on it; `None` when no
/// rollout of the app was ever recorded there.
pub async fn read_state(lb: &dyn Transport, inv: &Inventory) -> Result<Option<RolloutState>> {
    let command = journal::read_state_command(&inv.balancer.state_dir, &inv.app.name);
    let out = lb
        .exec(&command, None, Duration::from_secs(30))
        .await
        .map_err(|e| {
            Error::from(StateError::Read {
                reason: e.to_string(),
            })
        })?;
    if !out.success() {
        return Err(Error::from(StateError::Read {
            reason: out.stderr_text(),
        }));
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let file = format!(
        "{}:{}",
        inv.balancer.lock_host,
        journal::state_file(&inv.balancer.state_dir, &inv.app.name)
    );
    let state = serde_json::from_slice(&out.stdout).map_err(|e| {
        Error::from(StateError::Unreadable {
            file: file.clone(),
            reason: e.to_string(),
        })
    })?;
    trusted(state, inv, &file).map(Some)
}

/// The state if every value in it follows the rules roller writes it by; else an error naming
/// the file, before anything acts on it.
pub fn trusted(state: RolloutState, inv: &Inventory, file: &str) -> Result<RolloutState> {
    let problems = state.problems(inv);
    if problems.is_empty() {
        return Ok(state);
    }
    Err(Error::from(StateError::Refused {
        file: file.to_string(),
        problems,
    }))
}
