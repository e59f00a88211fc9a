//! The one run behind every command that changes the fleet: under the deploy lock, reconcile
//! with what an earlier rollout left, run pre-flight, build the plan from what pre-flight saw,
//! and hand it to the executor with the rollout state it keeps up to date.
//!
//! A rollout, a resumed rollout, a recovery and a switch-back differ only in their [`Kind`]:
//! which state they carry on, which targets they aim at, which plan they build.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use super::{Control, Display, Finished, Hints, read_state, resume, rollback, switch_back};
use crate::balancer::Nginx;
use crate::discovery::FoundHost;
use crate::error::{Error, Result, StateError};
use crate::executor::{
    self, Executor, ExecutorInput, FailurePolicy, JournalAndLockHost, KeptState, Options,
    StateStore,
};
use crate::health::HttpOverSsh;
use crate::history;
use crate::hooks::ControllerHooks;
use crate::inventory::{Inventory, Strategy};
use crate::journal::{self, Journal, RolloutState, RunKind, Status, Tee};
use crate::lock;
use crate::plan::{Artifact, BatchSize, Plan, PlanInput};
use crate::reconcile::{self, Asked, SlotRecovery};
use crate::report::{Outcome, Reporter};
use crate::session::{self, Hold};
use crate::transport::Transport;

/// What a run is asked to do to the fleet, checked by the command that built it.
pub struct Deploy {
    /// With the strategy this run follows already set.
    pub inventory: Inventory,
    pub hints: Hints,
    pub release: String,
    /// `None` when every host must already hold the jar (a resume without `--artifact`), or
    /// when no jar is involved (recover, switch-back).
    pub artifact: Option<Artifact>,
    pub batch: BatchSize,
    /// Canary: wait for `roller promote` or `roller abort` after the last hold.
    pub pause: bool,
    pub on_failure: FailurePolicy,
    pub max_failed_hosts: usize,
    pub control: Control,
    /// The hosts this run may change (`--hosts`, `--tag`, or as the rollout recorded them);
    /// `None` for every host.
    pub selected: Option<BTreeSet<String>>,
    pub kind: Kind,
}

pub enum Kind {
    Rollout,
    /// Finishes the rollout in this state.
    Resume(RolloutState),
    /// Returns every host to its release from before the rollout in this state.
    Recover(RolloutState),
    /// Blue-green: traffic back to the other slot.
    SwitchBack,
    /// Rolling: `current` back to a release every host holds, `to` or the one before the live
    /// one, read from the hosts after pre-flight.
    Rollback {
        to: Option<String>,
    },
}

impl Kind {
    /// The command that runs this kind, as the history records it.
    fn command(&self) -> &'static str {
        match self {
            Kind::Rollout => "rollout",
            Kind::Resume(_) => "resume",
            Kind::Recover(_) => "recover",
            Kind::SwitchBack => "switch-back",
            Kind::Rollback { .. } => "rollback",
        }
    }
}

/// Appends the run's record to the history on the lock host, still under the lock (the
/// session is fenced). A history that cannot be written only warns: the run itself is over.
async fn append_history(lock_host: &dyn Transport, inv: &Inventory, record: &history::Record) {
    let file = history::file(&inv.balancer.state_dir, &inv.app.name);
    let command =
        crate::remote::state::append_bounded(&inv.balancer.state_dir, &file, history::KEEP);
    let line = bytes::Bytes::from(record.to_line());
    match lock_host.exec(&command, Some(line), HISTORY_DEADLINE).await {
        Ok(out) if out.success() => {}
        Ok(out) => eprintln!(
            "warning: could not record the rollout in {file}: {}",
            out.stderr_text()
        ),
        Err(e) => eprintln!("warning: could not record the rollout in {file}: {e}"),
    }
}

const HISTORY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

impl Deploy {
    /// `release` is what this run goes to, once known (a rollback learns it from the hosts).
    fn asked<'a>(&'a self, rollout_id: &'a str, release: &'a str) -> Asked<'a> {
        match &self.kind {
            Kind::Rollout | Kind::Rollback { .. } => Asked::Rollout {
                id: rollout_id,
                release,
            },
            Kind::Resume(s) => Asked::Resume(s),
            Kind::Recover(s) => Asked::Recover(s),
            Kind::SwitchBack => Asked::SwitchBack,
        }
    }
}

/// Runs `deploy` under the deploy lock. `Err` means nothing live was changed (or the lock was
/// lost); `Ok` carries the report of a run that reached the executor, whatever its outcome.
pub async fn run(deploy: Deploy, display: Display<'_>) -> Result<Finished> {
    let balancer = Nginx::new(
        &deploy.inventory.balancer,
        &deploy.inventory.app,
        &deploy.inventory.hosts,
    );
    let rollout_id = match &deploy.kind {
        Kind::Resume(state) | Kind::Recover(state) => state.id.clone(),
        Kind::Rollout | Kind::SwitchBack | Kind::Rollback { .. } => lock::new_id(),
    };
    let journal_dir = deploy.control.journal_dir();
    let hold = Hold {
        inventory: &deploy.inventory,
        release: &deploy.release,
        lock_wait: deploy.control.lock_wait,
        journal_dir: &journal_dir,
        resume_hint: &deploy.hints.resume,
    };
    session::hold(hold, async |held| {
        locked(&deploy, &balancer, held, &rollout_id, &journal_dir, display).await
    })
    .await
}

async fn locked(
    d: &Deploy,
    balancer: &Nginx,
    held: &session::Held,
    rollout_id: &str,
    journal_dir: &Path,
    display: Display<'_>,
) -> Result<Finished> {
    let inv = &d.inventory;
    let sessions = &held.sessions;
    let journal = Arc::new(
        Journal::create(journal_dir, &inv.app.name, rollout_id).map_err(|source| {
            Error::from(StateError::JournalWrite {
                dir: journal_dir.to_path_buf(),
                source,
            })
        })?,
    );
    journal.record(
        "lock",
        serde_json::json!({
            "acquired": format!("{:?}", held.acquired), "holder": held.me, "rollout": rollout_id
        }),
    );
    if let (Kind::Resume(state), None) = (&d.kind, &d.artifact)
        && let Some(sha) = &state.artifact_sha256
    {
        resume::verify_staged_jar(inv, sessions, d.selected.as_ref(), &state.release, sha).await?;
    }
    let prior = read_state(held.lock_host.as_ref(), inv).await?;
    let balancers = session::balancer_set(inv);
    // A rollback's release is read from the hosts, so what it takes over is decided then.
    let reconciled = match &d.kind {
        Kind::Rollback { .. } => None,
        _ => Some(reconcile::reconcile(
            d.asked(rollout_id, &d.release),
            prior.as_ref(),
            &balancers,
            &d.hints,
        )?),
    };

    let reporter: Arc<dyn Reporter> = Arc::new(Tee(vec![journal.clone(), display(inv)]));
    // Pre-flight only reads; a Ctrl-C while it waits on a slow host stops at once.
    let observed = session::unless_interrupted(
        &held.interrupt,
        executor::preflight(
            inv,
            balancer,
            &HttpOverSsh,
            sessions,
            d.artifact.as_ref().map(|a| a.bytes),
            reporter.as_ref(),
        ),
    )
    .await?;

    let recover = match &d.kind {
        Kind::Recover(state) => Some(reconcile::recover_targets(
            state,
            inv.hosts.iter().map(|h| h.name.as_str()),
        )),
        _ => None,
    };
    let (release, reconciled) = match (&d.kind, reconciled) {
        (Kind::Rollback { to }, _) => {
            let release =
                rollback::target(inv, sessions, &observed, to.as_deref(), d.selected.as_ref())
                    .await?;
            let reconciled = reconcile::reconcile(
                d.asked(rollout_id, &release),
                prior.as_ref(),
                &balancers,
                &d.hints,
            )?;
            (release, reconciled)
        }
        (_, Some(reconciled)) => (d.release.clone(), reconciled),
        (_, None) => unreachable!("only a rollback reconciles after pre-flight"),
    };
    let kind = match &d.kind {
        Kind::Rollback { .. } => RunKind::Rollback,
        Kind::Resume(s) | Kind::Recover(s) => s.kind,
        Kind::Rollout | Kind::SwitchBack => RunKind::Rollout,
    };
    let release = recover
        .as_ref()
        .and_then(|r| r.release.clone())
        .unwrap_or(release);
    let live_slot = observed.live_slot(inv);
    let plan = match (&d.kind, live_slot) {
        (Kind::SwitchBack, Some(live)) => {
            switch_back::refuse_silent_slot(inv, sessions, live).await?;
            Plan::switch_back(inv, balancer, live)?
        }
        (Kind::SwitchBack, None) => unreachable!("pre-flight fails when no slot is live"),
        // A blue-green release only ever moved traffic between slots: recovering it moves
        // traffic back to the slot that had it at pre-flight, if it is not there already.
        (Kind::Recover(s), Some(live)) if s.strategy == Strategy::BlueGreen => {
            let recovery = reconcile::slot_recovery(s, live, &d.hints.switch_back)?;
            let mut plan = Plan::switch_back(inv, balancer, live)?;
            match recovery {
                SlotRecovery::Stay => plan.batches.clear(),
                SlotRecovery::MoveBack => {
                    switch_back::refuse_silent_slot(inv, sessions, live).await?
                }
            }
            plan
        }
        _ => Plan::build(PlanInput {
            inventory: inv,
            balancer,
            release: release.clone(),
            artifact: d.artifact.clone(),
            batch: d.batch,
            observed: Some(&observed.hosts),
            unfinished: &reconciled.unfinished,
            targets: recover.as_ref().map(|r| &r.targets),
            selected: d.selected.as_ref(),
            strategy: inv.strategy,
            live_slot,
            pause: d.pause,
            adopt: observed.adopting(inv),
        })
        .map(|plan| Plan { kind, ..plan })?,
    };
    if let Some(recover) = &recover
        && !recover.unrecorded.is_empty()
    {
        eprintln!(
            "warning: no release from before the rollout is recorded for {}: left as they are",
            recover.unrecorded.join(", ")
        );
    }

    let before = reconciled.before.unwrap_or_else(|| {
        observed
            .hosts
            .iter()
            .map(|(h, o)| (h.clone(), o.release.clone()))
            .collect()
    });
    // A resumed rollout without --artifact goes on with the jar it recorded.
    let resumed = match &d.kind {
        Kind::Resume(s) => Some(s),
        _ => None,
    };
    let state = RolloutState {
        strategy: inv.strategy,
        kind,
        id: rollout_id.to_string(),
        app: inv.app.name.clone(),
        release: match &d.kind {
            Kind::Rollback { .. } => release.clone(),
            _ => d.release.clone(),
        },
        artifact: d
            .artifact
            .as_ref()
            .and_then(|a| a.path.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| resumed.and_then(|s| s.artifact.clone())),
        artifact_sha256: d
            .artifact
            .as_ref()
            .map(|a| a.sha256.clone())
            .or_else(|| resumed.and_then(|s| s.artifact_sha256.clone())),
        batch: d.batch,
        on_failure: d.on_failure,
        max_failed_hosts: d.max_failed_hosts,
        controller: held.me.owner.clone(),
        started: journal::now_secs(),
        updated: journal::now_secs(),
        status: Status::Running,
        before,
        hosts: BTreeMap::new(),
        out_of_pool: Vec::new(),
        balancers,
        live_slot: reconciled.live_slot_before.or(live_slot),
        found: match inv.discovery {
            Some(_) => inv
                .hosts
                .iter()
                .map(|h| FoundHost {
                    name: h.name.clone(),
                    address: h.address.clone(),
                })
                .collect(),
            None => Vec::new(),
        },
        selected: d.selected.iter().flatten().cloned().collect(),
    };
    let started = state.started;
    let store = JournalAndLockHost {
        session: sessions[&inv.balancer.lock_host].clone(),
        state_dir: inv.balancer.state_dir.clone(),
        journal: Some(journal.clone()),
    };
    let hooks = ControllerHooks::new(
        &inv.hooks,
        kind,
        plan.release.clone(),
        rollout_id.to_string(),
        plan.batches.iter().flat_map(|b| b.hosts.clone()).collect(),
        Some(journal.as_ref()),
    );
    // The last point where nothing has changed: a failing hook stops the run here.
    hooks.before_rollout().await?;
    let executor = Executor::new(ExecutorInput {
        plan: &plan,
        balancer,
        health: &HttpOverSsh,
        sessions,
        reporter: reporter.clone(),
        options: Options {
            on_failure: d.on_failure,
            max_failed_hosts: d.max_failed_hosts,
            resume_hint: d.hints.resume.clone(),
            recover_hint: d.hints.recover.clone(),
            rollout_id: rollout_id.to_string(),
        },
        interrupt: held.interrupt.clone(),
        state: Some(KeptState {
            store: &store,
            initial: state,
        }),
        observed: &observed,
        hooks: Some(&hooks),
    });
    let mut report = executor.run().await?;
    hooks.after_run(report.outcome).await;
    report.notes.extend(hooks.warnings());
    if matches!(d.kind, Kind::Recover(_))
        && report.outcome == Outcome::Succeeded
        && let Some(mut state) = executor.last_state()
    {
        state.status = Status::Recovered;
        store.save(&state).await;
    }
    let record = history::Record {
        id: rollout_id.to_string(),
        command: d.kind.command().into(),
        who: held.me.owner.clone(),
        started,
        ended: journal::now_secs().max(started),
        release: report.release.clone(),
        strategy: inv.strategy,
        batch: journal::batch_flag(d.batch),
        batches: plan.batches.len(),
        result: report.outcome,
        duration_ms: report.elapsed_ms,
        hosts: report
            .hosts
            .iter()
            .map(|h| history::HostRecord {
                name: h.name.clone(),
                outcome: h.outcome,
                release: h.release.clone(),
            })
            .collect(),
    };
    append_history(sessions[&inv.balancer.lock_host].as_ref(), inv, &record).await;
    reporter.finish(&report);
    Ok(Finished {
        report,
        journal: journal.path().to_path_buf(),
    })
}
