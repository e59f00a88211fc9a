//! `roller promote` and `roller abort`: word for a canary rollout paused with `--pause`, left
//! on the lock host where the running controller polls for it, from any machine.

use std::time::Duration;

use super::read_state;
use crate::error::{Error, Result, StateError, Unfinished};
use crate::inventory::Inventory;
use crate::journal::{RolloutState, Status};
use crate::session;

/// What the operator tells a paused canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go on to the rest of the fleet.
    Promote,
    /// Roll the canary back and stop.
    Abort,
}

impl Decision {
    /// As the decision file and the command line spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Promote => "promote",
            Decision::Abort => "abort",
        }
    }
}

/// Leaves `decision` for the running rollout, naming it so that a stale word never applies to
/// the next one, and returns that rollout's state.
pub async fn decide(inventory: &Inventory, decision: Decision) -> Result<RolloutState> {
    let lb = session::connect_lock_host(inventory).await?;
    let result = async {
        let state = read_state(lb.as_ref(), inventory)
            .await?
            .filter(|s| s.status == Status::Running)
            .ok_or_else(|| {
                Error::from(Unfinished::NotRunning {
                    app: inventory.app.name.clone(),
                    decision: decision.as_str(),
                })
            })?;
        let file = crate::plan::decision_file(inventory);
        let command = crate::remote::state::decide(
            &inventory.balancer.state_dir,
            &file,
            &format!("{} {}", decision.as_str(), state.id),
        );
        let out = lb
            .exec(&command, None, Duration::from_secs(30))
            .await
            .map_err(|e| Error::from(StateError::Decision(e)))?;
        if !out.success() {
            return Err(Error::from(StateError::DecisionRefused {
                file,
                stderr: out.stderr_text(),
            }));
        }
        Ok(state)
    }
    .await;
    lb.close().await;
    result
}
