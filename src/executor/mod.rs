//! Runs a [`Plan`] over transports: the only place where roller changes anything on a host.
//!
//! Phases run in order and the steps of a phase run concurrently. When a batch fails, the
//! failure policy decides what happens to it (and to earlier batches), so the fleet always ends
//! in a state the final report can describe host by host. The rollout state is saved at the
//! start, alongside every pool change (recording where the change leads), after a rollback or
//! undo, and at the end: resume treats every step between leaving the pool and returning to it
//! alike, and checks each host's real state anyway.
//!
//! Where things are: `preflight` (what the fleet looks like before anything changes), `batch`
//! (a batch going forward), `actions` (one function per action of a step), `step` (how a step
//! ends, and why it failed), `failure` (failure policies, rollback, undo, interruption),
//! `ledger` (each host's progress and outcome, behind one lock), `state` (where the rollout
//! state is kept).

mod actions;
mod batch;
mod failure;
mod ledger;
mod preflight;
mod state;
mod step;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

pub use self::preflight::{FleetAtPreflight, preflight, release_name, survey};
pub use self::state::{JournalAndLockHost, KeptState, StateStore};
pub use crate::transport::sessions::{
    Sessions, as_root, collect_sessions, connect, endpoints, run_as_configured, sudo_refusals,
};

use self::batch::BatchStop;
use self::ledger::Ledger;
use self::step::to_host_failure;
use crate::balancer::Balancer;
use crate::error::{Error, Result};
use crate::health::HealthCheck;
use crate::hooks::ControllerHooks;
use crate::journal::{self, RolloutState, Status};
use crate::plan::{Action, PhaseName, Plan, Step};
use crate::report::{Event, FailureAt, Outcome, Reporter, RolloutReport, StepState};

/// How long a single remote command may take, restart included (a JVM service may take a
/// while to stop gracefully).
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(300);
/// Uploads are bounded by size: a floor plus a pessimistic 5 MB/s.
const UPLOAD_FLOOR: Duration = Duration::from_secs(60);
/// Parallel uploads during staging: enough to fill a link, few enough not to starve it.
pub const STAGE_PARALLELISM: usize = 4;
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// One health probe during pre-flight and the capacity check: a snapshot, not a wait.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(3);

/// How long one host's upload of a jar of `bytes` may take.
pub fn upload_deadline(bytes: u64) -> Duration {
    UPLOAD_FLOOR + Duration::from_secs(bytes / 5_000_000)
}
const DECISION_POLL: Duration = Duration::from_secs(1);

/// What to do when a batch fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// The failed batch goes back to its previous release; earlier batches keep the new one.
    #[default]
    RollbackBatch,
    /// The failed batch and every earlier batch go back, batch by batch, draining first.
    RollbackAll,
    /// The failed batch stays out of the pool, as it is, for inspection.
    Halt,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::RollbackBatch => "rollback-batch",
            FailurePolicy::RollbackAll => "rollback-all",
            FailurePolicy::Halt => "halt",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub on_failure: FailurePolicy,
    /// Hosts that may fail (and be rolled back alone) before the batch fails as a whole.
    pub max_failed_hosts: usize,
    /// The command line that resumes this rollout, for the report's recovery steps.
    pub resume_hint: String,
    /// The command line that restores the previous releases.
    pub recover_hint: String,
    /// This rollout's id, which `roller promote` and `roller abort` name.
    pub rollout_id: String,
}

/// `Some(reason)` once the rollout must stop: Ctrl-C, SIGTERM, or a lost deploy lock.
pub type Interrupt = watch::Receiver<Option<String>>;

/// An interrupt that never fires, for callers without signals (tests, `plan`).
pub fn never_interrupted() -> Interrupt {
    let (tx, rx) = watch::channel(None);
    // Keep the sender alive forever so `changed()` never reports a closed channel.
    std::mem::forget(tx);
    rx
}

pub struct ExecutorInput<'a> {
    pub plan: &'a Plan,
    pub balancer: &'a dyn Balancer,
    pub health: &'a dyn HealthCheck,
    pub sessions: &'a Sessions,
    pub reporter: Arc<dyn Reporter>,
    pub options: Options,
    pub interrupt: Interrupt,
    /// Where the rollout's state is kept as it changes; `None` keeps it nowhere.
    pub state: Option<KeptState<'a>>,
    /// From pre-flight: each host's live release and pool membership.
    pub observed: &'a FleetAtPreflight,
    /// Controller-side hooks told of each completed batch; `None` for none.
    pub hooks: Option<&'a ControllerHooks<'a>>,
}

pub struct Executor<'a> {
    plan: &'a Plan,
    balancer: &'a dyn Balancer,
    health: &'a dyn HealthCheck,
    sessions: &'a Sessions,
    reporter: Arc<dyn Reporter>,
    options: Options,
    interrupt: Interrupt,
    store: Option<&'a dyn StateStore>,
    /// The state last saved: the store's copy, updated from the ledger at every save.
    state: Mutex<Option<RolloutState>>,
    started: Instant,
    ledger: Ledger,
    /// Set once roller is restoring the fleet (rollback, undo, finishing an interrupted
    /// batch), and never cleared: from then on no wait may be cut short, or the clean-up
    /// itself would strand hosts.
    cleaning_up: AtomicBool,
    hooks: Option<&'a ControllerHooks<'a>>,
}

impl<'a> Executor<'a> {
    pub fn new(input: ExecutorInput<'a>) -> Executor<'a> {
        Executor {
            ledger: Ledger::new(input.plan, input.observed),
            plan: input.plan,
            balancer: input.balancer,
            health: input.health,
            sessions: input.sessions,
            reporter: input.reporter,
            options: input.options,
            interrupt: input.interrupt,
            store: input.state.as_ref().map(|k| k.store),
            state: Mutex::new(input.state.map(|k| k.initial)),
            started: Instant::now(),
            cleaning_up: AtomicBool::new(false),
            hooks: input.hooks,
        }
    }

    /// Runs staging and every batch. `Err` means nothing live was changed (staging failed);
    /// `Ok` carries the report of a rollout that ran, whatever its outcome.
    pub async fn run(&self) -> Result<RolloutReport> {
        if let Some(reason) = self.interrupted() {
            return Ok(self.finish_interrupted(reason, None).await);
        }
        self.save(Status::Running).await;
        self.run_phase(None, &self.plan.stage, &BTreeSet::new())
            .await
            .map_err(|failures| Error::Preflight {
                failures: failures.into_iter().map(to_host_failure).collect(),
            })?;
        for (index, batch) in self.plan.batches.iter().enumerate() {
            // A batch the previous one took out of the pool is rolled back by run_batch
            // when interrupted; any other is left alone.
            if !batch.taken_out
                && let Some(reason) = self.interrupted()
            {
                return Ok(self.finish_interrupted(reason, None).await);
            }
            let next = self.plan.batches.get(index + 1);
            match self.run_batch(batch, next).await {
                Ok(()) => {
                    if let Some(hooks) = self.hooks {
                        hooks.after_batch(batch.number, &batch.hosts).await;
                    }
                }
                Err(BatchStop::Interrupted {
                    reason,
                    phase,
                    pool_changed,
                }) => {
                    let at = Some((batch, phase, pool_changed));
                    return Ok(self.finish_interrupted(reason, at).await);
                }
                Err(BatchStop::Failed {
                    failure,
                    pool_changed,
                }) => {
                    return Ok(self.fail(index, batch, failure, pool_changed).await);
                }
                Err(BatchStop::NextRefused(failure)) => {
                    let next = next.expect("only a batch with a next one hands over");
                    return Ok(self.fail(index + 1, next, failure, false).await);
                }
            }
        }
        // Pruning is housekeeping: a failure is reported but does not fail the rollout.
        let _ = self
            .run_phase(None, &self.plan.finish, &BTreeSet::new())
            .await;
        let report = self.report(None, None);
        self.save(journal_status(report.outcome)).await;
        Ok(report)
    }

    fn interrupted(&self) -> Option<String> {
        self.interrupt.borrow().clone()
    }

    fn start_cleanup(&self) {
        self.cleaning_up.store(true, Ordering::SeqCst);
    }

    /// Resolves when the rollout is interrupted, unless roller is cleaning up (then never).
    async fn interruption(&self) -> String {
        if self.cleaning_up.load(Ordering::SeqCst) {
            return std::future::pending().await;
        }
        let mut interrupt = self.interrupt.clone();
        wait_for_interrupt(&mut interrupt).await
    }

    /// Sleeps, unless interrupted first.
    async fn pause(&self, duration: Duration) -> std::result::Result<(), step::StepError> {
        tokio::select! {
            () = tokio::time::sleep(duration) => Ok(()),
            reason = self.interruption() => Err(step::StepError::interrupted(reason)),
        }
    }

    fn emit(
        &self,
        batch: Option<usize>,
        phase: PhaseName,
        target: &str,
        state: StepState,
        elapsed: Option<Duration>,
        message: Option<String>,
    ) {
        self.reporter.event(&Event {
            at_ms: self.started.elapsed().as_millis() as u64,
            unix_ms: crate::journal::now_ms(),
            batch,
            phase,
            target: target.to_string(),
            state,
            elapsed_ms: elapsed.map(|e| e.as_millis() as u64),
            message,
            down: None,
        });
    }

    /// An event about a step; a pool change also says which hosts it leaves out of the pool,
    /// so that its events can be lined up with what the load balancer did.
    fn emit_step(
        &self,
        batch: Option<usize>,
        phase: PhaseName,
        step: &Step,
        state: StepState,
        elapsed: Option<Duration>,
        message: Option<String>,
    ) {
        let down = match &step.action {
            Action::SetPool { pool, .. } => Some(pool.down.iter().cloned().collect()),
            _ => None,
        };
        self.reporter.event(&Event {
            at_ms: self.started.elapsed().as_millis() as u64,
            unix_ms: crate::journal::now_ms(),
            batch,
            phase,
            target: step.target.clone(),
            state,
            elapsed_ms: elapsed.map(|e| e.as_millis() as u64),
            message,
            down,
        });
    }

    /// Brings the rollout's state up to date with the ledger and hands it to the store.
    async fn save(&self, status: Status) {
        let Some(store) = self.store else {
            return;
        };
        let state = {
            let mut state = self.state.lock().expect("state lock");
            let Some(state) = state.as_mut() else {
                return;
            };
            state.status = status;
            state.updated = journal::now_secs();
            self.ledger.record(state);
            state.clone()
        };
        store.save(&state).await;
    }

    /// The rollout's state as last saved; `None` when it is kept nowhere.
    pub fn last_state(&self) -> Option<RolloutState> {
        self.state.lock().expect("state lock").clone()
    }

    fn report(&self, failure: Option<FailureAt>, interrupted: Option<String>) -> RolloutReport {
        self.ledger.report(
            self.plan,
            &self.options,
            failure,
            interrupted,
            self.started.elapsed().as_millis() as u64,
        )
    }
}

fn journal_status(outcome: Outcome) -> Status {
    match outcome {
        Outcome::Succeeded => Status::Succeeded,
        Outcome::RolledBack => Status::RolledBack,
        Outcome::RollbackIncomplete => Status::Incomplete,
        Outcome::Halted => Status::Halted,
        Outcome::Interrupted => Status::Interrupted,
    }
}

/// Resolves with the reason once `interrupt` fires; never, if it cannot any more.
pub async fn wait_for_interrupt(interrupt: &mut Interrupt) -> String {
    loop {
        if let Some(reason) = interrupt.borrow_and_update().clone() {
            return reason;
        }
        if interrupt.changed().await.is_err() {
            // The sender is gone: nobody can interrupt any more.
            std::future::pending::<()>().await;
        }
    }
}
