//! Where the rollout's state goes as the executor changes the fleet: behind a small trait, so
//! the executor needs neither the journal nor the lock host, and tests can keep every save.

use std::sync::Arc;

use super::COMMAND_DEADLINE;
use super::step::run;
use crate::journal::{self, Journal, RolloutState};
use crate::transport::Transport;

/// Where the executor keeps the rollout's state as it changes, for `resume` and `recover` to
/// read back. Saving never fails the rollout: a store logs what it could not write.
#[async_trait::async_trait]
pub trait StateStore: Send + Sync {
    async fn save(&self, state: &RolloutState);
}

/// The rollout's state in the local journal and on the lock host, where another machine's
/// `resume` or `recover` finds it.
pub struct JournalAndLockHost {
    /// The lock host's session.
    pub session: Arc<dyn Transport>,
    pub state_dir: String,
    pub journal: Option<Arc<Journal>>,
}

#[async_trait::async_trait]
impl StateStore for JournalAndLockHost {
    /// Both copies are written at once; the journal's fsync runs on a blocking thread so that
    /// it never stalls the steps running on the async workers.
    async fn save(&self, state: &RolloutState) {
        let local = async {
            if let Some(journal) = self.journal.clone() {
                let state = state.clone();
                if let Err(e) =
                    tokio::task::spawn_blocking(move || journal.record_state(&state)).await
                {
                    tracing::warn!("cannot record the rollout state in the journal: {e}");
                }
            }
        };
        let remote = async {
            let json = serde_json::to_vec_pretty(state).expect("state serializes");
            let command = journal::write_state_command(&self.state_dir, &state.app);
            if let Err(e) = run(
                self.session.as_ref(),
                &command,
                Some(json.into()),
                COMMAND_DEADLINE,
            )
            .await
            {
                tracing::warn!("cannot save the rollout state on the lock host: {e}");
            }
        };
        tokio::join!(local, remote);
    }
}

/// The state store a rollout writes to, and the state it starts from.
pub struct KeptState<'a> {
    pub store: &'a dyn StateStore,
    pub initial: RolloutState,
}
