//! One batch going forward, phase by phase: hosts that fail alone within
//! `--max-failed-hosts`, the handover that swaps this batch and the next in one pool change,
//! and where the batch stands when it stops.

use std::collections::BTreeSet;

use super::Executor;
use super::step::StepFailure;
use crate::journal::{Progress, Status};
use crate::plan::{Action, Batch, Phase, PhaseName, Role};

/// Why a batch stopped before finishing. `pool_changed` says whether the batch's pool had
/// been changed by then: a batch whose pool never changed (refused by the capacity guard, say)
/// must not have it rewritten on the way out either; one whose pool changed always does.
pub(super) enum BatchStop {
    Failed {
        failure: StepFailure,
        pool_changed: bool,
    },
    /// The batch completed, but the next one may not leave the pool: its capacity check,
    /// run at the end of this batch, failed. The next batch never left the pool.
    NextRefused(StepFailure),
    /// Interrupted before `phase` (an index into the batch's phases) ran to completion.
    Interrupted {
        reason: String,
        phase: usize,
        pool_changed: bool,
    },
}

impl Executor<'_> {
    pub(super) async fn run_batch(
        &self,
        batch: &Batch,
        next: Option<&Batch>,
    ) -> std::result::Result<(), BatchStop> {
        // A batch taken out by the previous one's return has its pool changed already.
        let mut pool_changed = batch.taken_out;
        // The next batch's capacity check, then the pool change that swaps the two.
        let handover = batch
            .return_alone
            .as_ref()
            .map(|_| batch.phases.len().saturating_sub(2));
        let mut failed: BTreeSet<String> = BTreeSet::new();
        for (index, phase) in batch.phases.iter().enumerate() {
            if let Some(reason) = self.interrupted() {
                return Err(BatchStop::Interrupted {
                    reason,
                    phase: index,
                    pool_changed,
                });
            }
            let phase = if phase.name == PhaseName::ReturnToPool && !failed.is_empty() {
                // Hosts that failed alone (within --max-failed-hosts) go back to their previous
                // release before the batch returns; those that cannot stay out.
                let unrestored = self.rollback(batch, Some(&failed), pool_changed).await;
                self.with_pool(phase, batch, &unrestored)
            } else {
                phase.clone()
            };
            let pool_phase = changes_pool(&phase);
            let result = if pool_phase {
                // Set before the change: a failure midway leaves the pool unknown, and
                // rollback must then restore it.
                pool_changed = true;
                // Resume treats every step between leaving the pool and returning to it alike
                // (unfinished), so the summary is only written when the pool changes, and it is
                // written ahead, recording where this change leads, alongside the change
                // itself: resume checks each host's real state anyway, so either order is
                // safe, and the write costs no time of its own.
                self.advance(batch, &phase, &failed);
                if handover.is_some_and(|h| index == h + 1)
                    && let Some(next) = next
                {
                    // The same change takes the next batch out.
                    self.advance(next, &phase, &BTreeSet::new());
                }
                let (result, ()) = tokio::join!(
                    self.run_phase(Some(batch.number), &phase, &failed),
                    self.save(Status::Running)
                );
                result
            } else {
                self.run_phase(Some(batch.number), &phase, &failed).await
            };
            match result {
                Ok(()) => {}
                Err(failures) => {
                    if let Some(f) = failures.iter().find(|f| f.interrupted) {
                        return Err(BatchStop::Interrupted {
                            reason: self.interrupted().unwrap_or_else(|| f.message.clone()),
                            phase: index,
                            pool_changed,
                        });
                    }
                    if Some(index) == handover {
                        return Err(self.return_alone(batch, &failed, failures).await);
                    }
                    let tolerable = failures.iter().all(|f| f.role == Role::App);
                    let total = self.ledger.count_failed_hosts(failures.len());
                    if !tolerable || total > self.options.max_failed_hosts {
                        return Err(BatchStop::Failed {
                            failure: failures.into_iter().next().expect("at least one"),
                            pool_changed,
                        });
                    }
                    for f in failures {
                        self.ledger.set_note(
                            &f.target,
                            format!(
                                "{} failed, tolerated by --max-failed-hosts: {}",
                                f.phase, f.message
                            ),
                        );
                        failed.insert(f.target);
                    }
                }
            }
            if !pool_phase {
                self.advance(batch, &phase, &failed);
            }
        }
        self.ledger.mark_updated(&batch.hosts, &failed);
        Ok(())
    }

    /// The next batch may not leave the pool: this one, healthy, returns on its own, and the
    /// rollout stops at the next batch, which was never touched.
    async fn return_alone(
        &self,
        batch: &Batch,
        failed: &BTreeSet<String>,
        refused: Vec<StepFailure>,
    ) -> BatchStop {
        let alone = batch
            .return_alone
            .as_ref()
            .expect("a handover has a return of its own");
        let unrestored = if failed.is_empty() {
            Vec::new()
        } else {
            self.rollback(batch, Some(failed), true).await
        };
        let alone = self.with_pool(alone, batch, &unrestored);
        self.advance(batch, &alone, failed);
        let (result, ()) = tokio::join!(
            self.run_phase(Some(batch.number), &alone, failed),
            self.save(Status::Running)
        );
        let refused = refused.into_iter().next().expect("at least one");
        match result {
            Ok(()) => {
                self.ledger.mark_updated(&batch.hosts, failed);
                BatchStop::NextRefused(refused)
            }
            Err(failures) => BatchStop::Failed {
                failure: failures.into_iter().next().expect("at least one"),
                pool_changed: true,
            },
        }
    }

    /// Records how far the batch's hosts got once `phase` succeeded for them.
    pub(super) fn advance(&self, batch: &Batch, phase: &Phase, failed: &BTreeSet<String>) {
        let Some(action) = phase.steps.first().map(|s| &s.action) else {
            return;
        };
        for host in batch.hosts.iter().filter(|h| !failed.contains(*h)) {
            if let Some(progress) = progress_after(action, host) {
                self.ledger
                    .advance(std::slice::from_ref(host), progress, failed);
            }
        }
    }

    /// The phase with its pool changed: the batch's held-out hosts plus `failed` down.
    pub(super) fn with_pool(&self, phase: &Phase, batch: &Batch, failed: &[String]) -> Phase {
        let mut phase = phase.clone();
        for step in &mut phase.steps {
            if let Action::SetPool { pool } = &mut step.action {
                // Hosts of other batches the change takes out (the next batch, at a handover)
                // stay out; of this batch, only those that could not be restored.
                pool.down = pool
                    .down
                    .iter()
                    .filter(|h| !batch.hosts.contains(*h))
                    .chain(&batch.held_out)
                    .chain(failed)
                    .cloned()
                    .collect();
            }
        }
        phase
    }
}

/// Whether the phase rewrites the load balancers' pool.
pub(super) fn changes_pool(phase: &Phase) -> bool {
    phase
        .steps
        .iter()
        .any(|s| matches!(s.action, Action::SetPool { .. }))
}

/// How far a host has got once `action` succeeded for it. A pool change takes it as far as
/// out of the pool (drained, once the drain follows) or back in it, healthy.
fn progress_after(action: &Action, host: &str) -> Option<Progress> {
    match action {
        Action::Drain { .. } => Some(Progress::Drained),
        Action::Switch { .. } => Some(Progress::Switched),
        Action::Restart { .. } | Action::StartSlot { .. } => Some(Progress::Restarted),
        Action::HealthCheck(_) => Some(Progress::Done),
        Action::SetPool { pool, .. } if pool.down.contains(host) => Some(Progress::Drained),
        Action::SetPool { .. } => Some(Progress::Done),
        _ => None,
    }
}
