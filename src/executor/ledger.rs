//! What the executor knows about every app host and load balancer as the rollout goes, behind
//! one lock. The rollout state saved for `resume` and the final report are both read from it,
//! so the two can never tell different stories.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use super::{FleetAtPreflight, Options};
use crate::journal::{Progress, RolloutState};
use crate::plan::Plan;
use crate::report::{FailureAt, HostOutcome, HostReport, Outcome, RolloutReport};

/// One app host as the executor knows it.
#[derive(Debug, Clone)]
pub(super) struct HostState {
    pub release: Option<String>,
    /// The release it served when the rollout started.
    pub initial_release: Option<String>,
    pub progress: Progress,
    /// Whether this rollout may have moved `current`: rollback must then move it back.
    pub switched: bool,
    pub in_pool: bool,
    pub outcome: Option<HostOutcome>,
    pub note: Option<String>,
}

struct Entries {
    hosts: BTreeMap<String, HostState>,
    /// Load balancers whose pool state is unknown after a failed apply.
    unsure_balancers: BTreeSet<String>,
    /// Hosts that failed alone so far, against `--max-failed-hosts`.
    failed_hosts: usize,
    /// Why the rollout ended the way it did, beyond the failure itself.
    notes: Vec<String>,
}

pub(super) struct Ledger(Mutex<Entries>);

impl Ledger {
    /// Every host of the plan as pre-flight found it; skipped hosts are already done.
    pub fn new(plan: &Plan, observed: &FleetAtPreflight) -> Ledger {
        let skipped: BTreeSet<&String> = plan.skipped.iter().map(|s| &s.host).collect();
        let not_selected: BTreeSet<&String> = plan
            .skipped
            .iter()
            .filter(|s| s.not_selected)
            .map(|s| &s.host)
            .collect();
        let hosts = plan
            .hosts
            .iter()
            .map(|h| {
                let seen = observed.hosts.get(&h.name);
                let skip = skipped.contains(&h.name);
                (
                    h.name.clone(),
                    HostState {
                        release: seen.and_then(|o| o.release.clone()),
                        initial_release: seen.and_then(|o| o.release.clone()),
                        progress: if skip {
                            Progress::Done
                        } else {
                            Progress::Pending
                        },
                        switched: false,
                        in_pool: seen.is_none_or(|o| o.in_pool),
                        outcome: match (skip, not_selected.contains(&h.name)) {
                            (_, true) => Some(HostOutcome::Untouched),
                            (true, false) => Some(HostOutcome::Updated),
                            (false, false) => None,
                        },
                        note: match (skip, not_selected.contains(&h.name)) {
                            (_, true) => Some("not selected (--hosts, --tag)".to_string()),
                            (true, false) => Some("already on the release".to_string()),
                            (false, false) => None,
                        },
                    },
                )
            })
            .collect();
        Ledger(Mutex::new(Entries {
            hosts,
            unsure_balancers: BTreeSet::new(),
            failed_hosts: 0,
            notes: Vec::new(),
        }))
    }

    fn entries(&self) -> MutexGuard<'_, Entries> {
        self.0.lock().expect("ledger lock")
    }

    pub fn host(&self, name: &str) -> HostState {
        self.entries().hosts[name].clone()
    }

    pub fn with_host(&self, name: &str, f: impl FnOnce(&mut HostState)) {
        if let Some(state) = self.entries().hosts.get_mut(name) {
            f(state);
        }
    }

    pub fn set_note(&self, name: &str, note: String) {
        self.with_host(name, |h| h.note = Some(note));
    }

    pub fn note(&self, note: String) {
        self.entries().notes.push(note);
    }

    pub fn set_outcome(&self, names: &[String], outcome: HostOutcome) {
        let mut entries = self.entries();
        for name in names {
            if let Some(h) = entries.hosts.get_mut(name) {
                h.outcome = Some(outcome);
            }
        }
    }

    /// Every host of `hosts` outside `failed` got at least as far as `progress`.
    pub fn advance(&self, hosts: &[String], progress: Progress, failed: &BTreeSet<String>) {
        let mut entries = self.entries();
        for name in hosts.iter().filter(|h| !failed.contains(*h)) {
            if let Some(h) = entries.hosts.get_mut(name) {
                h.progress = h.progress.max(progress);
            }
        }
    }

    /// Every host of `hosts` outside `failed` now runs the release.
    pub fn mark_updated(&self, hosts: &[String], failed: &BTreeSet<String>) {
        let updated: Vec<String> = hosts
            .iter()
            .filter(|h| !failed.contains(*h))
            .cloned()
            .collect();
        self.set_outcome(&updated, HostOutcome::Updated);
    }

    /// `balancer` confirmed a pool with exactly `down` out of it.
    pub fn pool_applied(&self, balancer: &str, down: &BTreeSet<String>) {
        let mut entries = self.entries();
        entries.unsure_balancers.remove(balancer);
        for (name, state) in entries.hosts.iter_mut() {
            state.in_pool = !down.contains(name);
        }
    }

    /// A pool change on `balancer` may or may not have taken effect.
    pub fn pool_unknown(&self, balancer: &str) {
        self.entries().unsure_balancers.insert(balancer.to_string());
    }

    /// Counts `n` more hosts that failed alone; returns how many have so far.
    pub fn count_failed_hosts(&self, n: usize) -> usize {
        let mut entries = self.entries();
        entries.failed_hosts += n;
        entries.failed_hosts
    }

    /// Writes each host's progress and the hosts out of the pool into `state`.
    pub fn record(&self, state: &mut RolloutState) {
        let entries = self.entries();
        state.hosts = entries
            .hosts
            .iter()
            .map(|(name, h)| (name.clone(), h.progress))
            .collect();
        state.out_of_pool = entries
            .hosts
            .iter()
            .filter(|(_, h)| !h.in_pool)
            .map(|(name, _)| name.clone())
            .collect();
    }

    /// The final report: each host's outcome, what a human must finish, and why.
    pub fn report(
        &self,
        plan: &Plan,
        options: &Options,
        failure: Option<FailureAt>,
        interrupted: Option<String>,
        elapsed_ms: u64,
    ) -> RolloutReport {
        let entries = self.entries();
        let hosts = &entries.hosts;
        let unsure = &entries.unsure_balancers;
        let reports: Vec<HostReport> = plan
            .hosts
            .iter()
            .map(|h| {
                let state = &hosts[&h.name];
                HostReport {
                    name: h.name.clone(),
                    outcome: state.outcome.unwrap_or(HostOutcome::Untouched),
                    release: state.release.clone(),
                    in_pool: state.in_pool && unsure.is_empty(),
                    note: state.note.clone(),
                }
            })
            .collect();
        let mut recovery = Vec::new();
        for lb in unsure.iter() {
            recovery.push(format!(
                "load balancer {lb}: its pool state is unknown. Check {} there, make sure every healthy host is listed without `down`, then run `{}`",
                plan.upstream_file, plan.reload
            ));
        }
        for h in reports.iter().filter(|h| h.outcome == HostOutcome::Failed) {
            recovery.push(format!(
                "{}: not healthy after rollback ({}). It is marked `down` in {} on every load balancer. Once it answers its health check, run `{}` to put everyone back on the previous release and in the pool, or remove `down` from its line there and run `{}`",
                h.name,
                h.note.as_deref().unwrap_or("see the log above"),
                plan.upstream_file,
                options.recover_hint,
                plan.reload
            ));
        }
        let halted: Vec<&str> = reports
            .iter()
            .filter(|h| h.outcome == HostOutcome::Halted)
            .map(|h| h.name.as_str())
            .collect();
        if !halted.is_empty() {
            recovery.push(format!(
                "{} left out of the pool for inspection. To finish the rollout: `{}`; to go back to the previous release everywhere: `{}`",
                halted.join(", "),
                options.resume_hint,
                options.recover_hint
            ));
        }
        let outcome = if !recovery.is_empty() {
            if halted.is_empty() {
                Outcome::RollbackIncomplete
            } else {
                Outcome::Halted
            }
        } else if interrupted.is_some() {
            Outcome::Interrupted
        } else if failure.is_some() || reports.iter().any(|h| h.outcome == HostOutcome::RolledBack)
        {
            Outcome::RolledBack
        } else {
            Outcome::Succeeded
        };
        RolloutReport {
            release: plan.release.clone(),
            kind: plan.kind,
            outcome,
            failure,
            interrupted,
            hosts: reports,
            notes: entries.notes.clone(),
            recovery,
            elapsed_ms,
        }
    }
}
