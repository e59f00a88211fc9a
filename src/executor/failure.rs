//! What happens when a batch cannot go on: the failure policy (roll the batch back, undo
//! earlier batches too, or halt), the rollback of a batch or of single hosts, and an
//! interrupt, which rolls back or completes the batch in progress.

use std::collections::BTreeSet;

use super::batch::changes_pool;
use super::step::{StepFailure, to_host_failure};
use super::{Executor, FailurePolicy, journal_status};
use crate::inventory::Strategy;
use crate::journal::{Progress, Status};
use crate::plan::{Batch, PhaseName};
use crate::report::{FailureAt, HostOutcome, RolloutReport};

impl Executor<'_> {
    /// Applies the failure policy to a failed batch (and, for rollback-all, earlier ones).
    pub(super) async fn fail(
        &self,
        index: usize,
        batch: &Batch,
        failure: StepFailure,
        pool_changed: bool,
    ) -> RolloutReport {
        self.start_cleanup();
        let at = FailureAt {
            batch: batch.number,
            failure: to_host_failure(failure),
        };
        match self.options.on_failure {
            FailurePolicy::Halt => {
                self.ledger.note(format!(
                    "--on-failure halt: batch {} was left as it is, out of the pool, for inspection",
                    batch.number
                ));
                let halted: Vec<String> = batch
                    .hosts
                    .iter()
                    .filter(|h| {
                        self.ledger.host(h).progress != Progress::Done
                            || !self.ledger.host(h).in_pool
                    })
                    .cloned()
                    .collect();
                self.ledger.set_outcome(&halted, HostOutcome::Halted);
            }
            FailurePolicy::RollbackBatch => {
                self.rollback(batch, None, pool_changed).await;
            }
            FailurePolicy::RollbackAll => {
                self.rollback(batch, None, pool_changed).await;
                for earlier in self.plan.batches[..index].iter().rev() {
                    if self.undo(earlier).await.is_err() {
                        self.ledger.note(format!(
                            "undoing batch {} failed: earlier batches were left on the new release",
                            earlier.number
                        ));
                        break;
                    }
                }
            }
        }
        let report = self.report(Some(at), None);
        self.save(journal_status(report.outcome)).await;
        report
    }

    /// Stops after an interrupt: a batch in progress is rolled back, or completed when only
    /// returning it to the pool was left, which is less than rolling back would take.
    pub(super) async fn finish_interrupted(
        &self,
        reason: String,
        at: Option<(&Batch, usize, bool)>,
    ) -> RolloutReport {
        self.start_cleanup();
        if let Some((batch, phase, pool_changed)) = at {
            let remaining = &batch.phases[phase..];
            let handing_over = batch
                .return_alone
                .as_ref()
                .filter(|_| phase + 2 >= batch.phases.len());
            if let Some(alone) = handing_over {
                // Interrupted at the handover: this batch returns alone, the next stays in.
                self.ledger.note(format!(
                    "batch {} was completed rather than rolled back: its hosts were already healthy on the new release; the next batch was not started",
                    batch.number
                ));
                let alone = self.with_pool(alone, batch, &[]);
                if self
                    .run_phase(Some(batch.number), &alone, &BTreeSet::new())
                    .await
                    .is_ok()
                {
                    self.advance(batch, &alone, &BTreeSet::new());
                    self.ledger.set_outcome(&batch.hosts, HostOutcome::Updated);
                } else {
                    self.rollback(batch, None, true).await;
                }
            } else if remaining.len() == 1 && remaining[0].name == PhaseName::ReturnToPool {
                self.ledger.note(format!(
                    "batch {} was completed rather than rolled back: its hosts were already healthy on the new release, so returning them to the pool was one step where rolling back would have meant another restart",
                    batch.number
                ));
                let finished = self
                    .run_phase(Some(batch.number), &remaining[0], &BTreeSet::new())
                    .await;
                if finished.is_ok() {
                    self.ledger.set_outcome(&batch.hosts, HostOutcome::Updated);
                } else {
                    self.rollback(batch, None, pool_changed).await;
                }
            } else {
                self.ledger.note(format!(
                    "batch {} was rolled back: it was interrupted before its hosts were healthy on the new release",
                    batch.number
                ));
                self.rollback(batch, None, pool_changed).await;
            }
        }
        let report = self.report(None, Some(reason));
        self.save(journal_status(report.outcome)).await;
        report
    }

    /// Brings hosts of a failed batch (all of them, or `only`) back to their previous release
    /// and into the pool. Returns the hosts that could not be restored: they stay out of the
    /// pool and are reported as failed.
    pub(super) async fn rollback(
        &self,
        batch: &Batch,
        only: Option<&BTreeSet<String>>,
        pool_changed: bool,
    ) -> Vec<String> {
        let members: Vec<String> = batch
            .hosts
            .iter()
            .filter(|h| only.is_none_or(|o| o.contains(*h)))
            .cloned()
            .collect();
        let outside: BTreeSet<String> = batch
            .hosts
            .iter()
            .filter(|h| !members.contains(h))
            .cloned()
            .collect();
        let never_switched: BTreeSet<String> = members
            .iter()
            .filter(|h| !self.ledger.host(h).switched)
            .cloned()
            .collect();
        let mut excluded: BTreeSet<String> = never_switched.union(&outside).cloned().collect();
        let mut unrestored: Vec<String> = Vec::new();
        for phase in &batch.rollback {
            if changes_pool(phase) {
                if only.is_some() || !pool_changed {
                    // With `only`, the caller returns the whole batch to the pool itself.
                    continue;
                }
                let phase = if phase.name == PhaseName::ReturnToPool {
                    self.with_pool(phase, batch, &unrestored)
                } else {
                    phase.clone()
                };
                if let Err(failures) = self
                    .run_phase(Some(batch.number), &phase, &BTreeSet::new())
                    .await
                {
                    for f in failures {
                        self.ledger.note(format!(
                            "returning batch {} to the pool on {} failed: {}",
                            batch.number, f.target, f.message
                        ));
                    }
                }
                continue;
            }
            if let Err(failures) = self.run_phase(Some(batch.number), phase, &excluded).await {
                for f in failures {
                    self.ledger.set_note(
                        &f.target,
                        format!("rollback {} failed: {}", f.phase, f.message),
                    );
                    unrestored.push(f.target.clone());
                    excluded.insert(f.target);
                }
            }
        }
        let restored: Vec<String> = members
            .iter()
            .filter(|h| !unrestored.contains(h))
            .cloned()
            .collect();
        for name in &restored {
            let blue_green = self.plan.strategy == Strategy::BlueGreen;
            self.ledger.with_host(name, |h| {
                h.progress = Progress::RolledBack;
                h.switched = false;
                if blue_green {
                    // Traffic is back on the slot that served before.
                    h.release = h.initial_release.clone();
                }
            });
        }
        for name in &unrestored {
            self.ledger
                .with_host(name, |h| h.progress = Progress::Failed);
        }
        self.ledger.set_outcome(&restored, HostOutcome::RolledBack);
        self.ledger.set_outcome(&unrestored, HostOutcome::Failed);
        self.save(Status::Running).await;
        unrestored
    }

    /// Takes a completed batch back to its previous release, draining it first.
    pub(super) async fn undo(&self, batch: &Batch) -> std::result::Result<(), ()> {
        for name in &batch.hosts {
            self.ledger.with_host(name, |h| h.switched = true);
        }
        for phase in &batch.undo {
            if let Err(failures) = self
                .run_phase(Some(batch.number), phase, &BTreeSet::new())
                .await
            {
                for f in &failures {
                    self.ledger
                        .set_note(&f.target, format!("undo {} failed: {}", f.phase, f.message));
                }
                // The batch may be out of the pool, half switched: the normal rollback
                // brings back what it can and reports the rest.
                self.rollback(batch, None, true).await;
                return Err(());
            }
        }
        for name in &batch.hosts {
            self.ledger.with_host(name, |h| {
                h.progress = Progress::RolledBack;
                h.switched = false;
            });
        }
        self.ledger
            .set_outcome(&batch.hosts, HostOutcome::RolledBack);
        self.save(Status::Running).await;
        Ok(())
    }
}
