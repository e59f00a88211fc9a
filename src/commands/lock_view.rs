//! What the lock host says about the deploy lock and the last rollout, read without taking the
//! lock or writing anything: `roller status` shows it, `roller check` refuses on it.

use std::time::Duration;

use serde::Serialize;

use super::Hints;
use crate::error::{Error, Result, StateError, Unfinished};
use crate::inventory::Inventory;
use crate::journal::RolloutState;
use crate::lock::{self, LockInfo};
use crate::session;
use crate::transport::Transport;

/// The deploy lock as found, and whether a rollout starting now would be kept out by it.
#[derive(Debug, Clone, Serialize)]
pub struct LockHolder {
    #[serde(flatten)]
    pub holder: LockInfo,
    /// The lease runs by the lock host's clock and its holder is not provably gone: a new
    /// rollout waits for it or fails (exit 7) instead of taking it over.
    pub live: bool,
}

/// The lock's holder, if anyone holds it.
pub async fn holder(lb: &dyn Transport, inv: &Inventory) -> Result<Option<LockHolder>> {
    let spec = session::lock_spec(inv);
    let found = lock::read(lb, &spec)
        .await
        .map_err(|e| Error::from(StateError::Lock(e)))?;
    let Some(holder) = found else {
        return Ok(None);
    };
    let out = lb
        .exec(&crate::remote::lock::clock(), None, Duration::from_secs(30))
        .await
        .map_err(|e| {
            Error::from(StateError::Read {
                reason: e.to_string(),
            })
        })?;
    // Unreadable clock: the lease counts as live, the safe side for "could a rollout start".
    let now: Option<u64> = out.stdout_text().trim().parse().ok();
    let live = now.is_none_or(|now| holder.lease_until >= now) && !lock::holder_is_gone(&holder);
    Ok(Some(LockHolder { holder, live }))
}

/// The last rollout recorded on the lock host, if it did not finish, with the command that
/// finishes it: the refusal a new rollout would meet, word for word.
pub fn unfinished(state: &RolloutState, hints: &Hints) -> Option<Unfinished> {
    state.status.unfinished().then(|| Unfinished::InTheWay {
        id: state.id.clone(),
        release: state.release.clone(),
        status: state.status,
        resume_hint: hints.resume.clone(),
        recover_hint: hints.recover.clone(),
    })
}
