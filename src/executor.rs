//! Runs a [`Plan`] over transports: the only place where roller changes anything on a host.
//!
//! Phases run in order and the steps of a phase run concurrently. When a batch fails, the
//! failure policy decides what happens to it (and to earlier batches), so the fleet always ends
//! in a state the final report can describe host by host. Every phase boundary is written to
//! the journal and to the load balancer's copy of the rollout state before going on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::balancer::{APPLY_REJECTED, APPLY_UNCONFIRMED, Balancer};
use crate::canary;
use crate::error::{Error, HostFailure, Result};
use crate::health::{HealthCheck, HealthSpec};
use crate::inventory::{Inventory, Slot, Strategy};
use crate::journal::{self, Journal, Progress, RolloutState, Status};
use crate::plan::{Action, Batch, HostAtPreflight, Phase, PhaseName, Plan, Role, Step, is_release};
use crate::remote::quote;
use crate::report::{
    Event, FailureAt, HostOutcome, HostReport, Outcome, Reporter, RolloutReport, StepState,
};
use crate::transport::reconnect::{Reconnecting, RetryPolicy};
use crate::transport::{Connector, Endpoint, Transport};

/// How long a single remote command may take, restart included (a JVM service may take a
/// while to stop gracefully).
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(300);
/// Uploads are bounded by size: a floor plus a pessimistic 5 MB/s.
const UPLOAD_FLOOR: Duration = Duration::from_secs(60);
/// Parallel uploads during staging: enough to fill a link, few enough not to starve it.
const STAGE_PARALLELISM: usize = 4;
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// One health probe during pre-flight and the capacity check: a snapshot, not a wait.
const PROBE_DEADLINE: Duration = Duration::from_secs(3);
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

/// Open sessions, keyed by plan target (app host name or load-balancer address).
pub type Sessions = HashMap<String, Arc<dyn Transport>>;

/// Every host and load balancer to connect to, named as the plan names them.
pub fn endpoints(inv: &Inventory) -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = inv
        .hosts
        .iter()
        .map(|h| Endpoint {
            name: h.name.clone(),
            address: h.address.clone(),
            port: inv.ssh.port,
            user: h.user.clone(),
        })
        .collect();
    endpoints.extend(inv.balancer.hosts.iter().map(|lb| Endpoint {
        name: lb.clone(),
        address: lb.clone(),
        port: inv.ssh.port,
        user: None,
    }));
    endpoints
}

/// Opens one session per app host and load balancer, all at once. Any failure is a pre-flight
/// failure: nothing has been changed yet. Each session re-establishes itself if its
/// connection drops later: every command roller sends is safe to repeat.
pub async fn connect(inv: &Inventory, connector: Arc<dyn Connector>) -> Result<Sessions> {
    let endpoints = endpoints(inv);
    let results = join_all(endpoints.iter().map(|e| {
        let connector = connector.clone();
        async move {
            Reconnecting::connect(connector, e.clone(), RetryPolicy::default())
                .await
                .map(|s| s as Arc<dyn Transport>)
        }
    }))
    .await;
    collect_sessions(endpoints, results).await
}

/// Pairs endpoints with connection results; closes what opened if anything failed.
pub async fn collect_sessions(
    endpoints: Vec<Endpoint>,
    results: Vec<std::result::Result<Arc<dyn Transport>, crate::transport::TransportError>>,
) -> Result<Sessions> {
    let mut sessions = HashMap::new();
    let mut failures = Vec::new();
    for (endpoint, result) in endpoints.into_iter().zip(results) {
        match result {
            Ok(session) => {
                sessions.insert(endpoint.name, session);
            }
            Err(e) => failures.push(HostFailure {
                host: endpoint.name,
                step: "connect".into(),
                message: e.to_string(),
            }),
        }
    }
    if failures.is_empty() {
        Ok(sessions)
    } else {
        for session in sessions.values() {
            session.close().await;
        }
        Err(Error::Preflight { failures })
    }
}

/// What pre-flight found.
#[derive(Debug, Clone, Default)]
pub struct FleetAtPreflight {
    pub hosts: BTreeMap<String, HostAtPreflight>,
    /// The port the load balancers send traffic to, when every server of every load balancer
    /// shares one: for blue-green, the live slot.
    pub live_port: Option<u16>,
}

impl FleetAtPreflight {
    /// The live blue-green slot, from the port the load balancers use.
    pub fn live_slot(&self, inv: &Inventory) -> Option<Slot> {
        let bg = inv.blue_green.as_ref()?;
        match self.live_port? {
            p if p == bg.blue_port => Some(Slot::Blue),
            p if p == bg.green_port => Some(Slot::Green),
            _ => None,
        }
    }

    /// Blue-green on a fleet that still runs one process per host: every load balancer sends
    /// traffic to `app.port`, which is neither slot's port.
    pub fn adopting(&self, inv: &Inventory) -> bool {
        inv.blue_green.as_ref().is_some_and(|bg| {
            self.live_port == Some(inv.app.port)
                && inv.app.port != bg.blue_port
                && inv.app.port != bg.green_port
        })
    }
}

/// Runs pre-flight on every host and load balancer and returns what it found: each host's
/// live release, health, and pool membership. Fails if any check fails.
pub async fn preflight(
    inv: &Inventory,
    balancer: &dyn Balancer,
    health: &dyn HealthCheck,
    sessions: &Sessions,
    artifact_bytes: Option<u64>,
    reporter: &dyn Reporter,
) -> Result<FleetAtPreflight> {
    let phase = Plan::preflight(inv, balancer);
    let started = Instant::now();
    let emit = |target: &str, state, elapsed: Option<Duration>, message: Option<String>| {
        reporter.event(&Event {
            at_ms: started.elapsed().as_millis() as u64,
            unix_ms: crate::journal::now_ms(),
            batch: None,
            phase: PhaseName::Preflight,
            target: target.to_string(),
            state,
            elapsed_ms: elapsed.map(|e| e.as_millis() as u64),
            message,
            down: None,
        })
    };
    let results = join_all(phase.steps.iter().map(|step| async move {
        emit(&step.target, StepState::Started, None, None);
        let t0 = Instant::now();
        let session = &sessions[&step.target];
        let Action::Run { command } = &step.action else {
            unreachable!("pre-flight steps are commands")
        };
        let result = run(session.as_ref(), command, None, COMMAND_DEADLINE).await;
        match &result {
            Ok(_) => emit(&step.target, StepState::Succeeded, Some(t0.elapsed()), None),
            Err(m) => emit(
                &step.target,
                StepState::Failed,
                Some(t0.elapsed()),
                Some(m.clone()),
            ),
        }
        (step, result)
    }))
    .await;

    let mut failures = Vec::new();
    let mut facts_of: BTreeMap<String, HashMap<String, String>> = BTreeMap::new();
    let mut down = BTreeSet::new();
    let mut ports = BTreeSet::new();
    let mut unreadable_port = false;
    for (step, result) in results {
        let stdout = match result {
            Ok(stdout) => stdout,
            Err(message) => {
                failures.push(HostFailure {
                    host: step.target.clone(),
                    step: "preflight".into(),
                    message,
                });
                continue;
            }
        };
        if step.role == Role::Balancer {
            down.extend(balancer.parse_down(&stdout));
            match balancer.parse_port(&stdout) {
                Some(p) => {
                    ports.insert(p);
                }
                None => unreadable_port = true,
            }
            continue;
        }
        let facts: HashMap<String, String> = stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let (Some(free_kb), Some(bytes)) = (
            facts.get("free_kb").and_then(|f| f.parse::<u64>().ok()),
            artifact_bytes,
        ) {
            // Room for the partial upload and the final file side by side would be twice
            // the jar; a margin on top keeps the host from filling its disk.
            let needed_kb = bytes.div_ceil(1024) * 2 + 10 * 1024;
            if free_kb < needed_kb {
                failures.push(HostFailure {
                    host: step.target.clone(),
                    step: "preflight".into(),
                    message: format!(
                        "not enough disk: {free_kb} KiB free, the jar needs {needed_kb} KiB"
                    ),
                });
            }
        }
        facts_of.insert(step.target.clone(), facts);
    }
    let live_port = match (ports.len(), unreadable_port) {
        (1, false) => ports.into_iter().next(),
        _ => None,
    };
    let mut observation = FleetAtPreflight {
        hosts: BTreeMap::new(),
        live_port,
    };
    let live_slot = observation.live_slot(inv);
    let adopt_stop = inv
        .blue_green
        .as_ref()
        .and_then(|bg| bg.adopt_stop.as_ref());
    if inv.strategy == Strategy::BlueGreen
        && failures.is_empty()
        && live_slot.is_none()
        && observation.adopting(inv)
    {
        if adopt_stop.is_none() {
            failures.push(HostFailure {
                host: inv.balancer.hosts[0].clone(),
                step: "preflight".into(),
                message: format!(
                    "the upstream files send traffic to app.port {}, a single-port deployment: to adopt blue-green, set blue_green.adopt_stop to the command that stops that process; the first blue-green release then starts in the blue slots, moves traffic there, and runs it after keep_old (README: Adopting blue-green)",
                    inv.app.port
                ),
            });
        }
    } else if inv.strategy == Strategy::BlueGreen && failures.is_empty() && live_slot.is_none() {
        failures.push(HostFailure {
            host: inv.balancer.hosts[0].clone(),
            step: "preflight".into(),
            message: format!(
                "cannot tell which blue-green slot is live: the upstream files use port(s) {}, expected every server on blue_port or every server on green_port",
                live_port.map(|p| p.to_string()).unwrap_or_else(|| "that differ or could not be read".into())
            ),
        });
    }
    // Health is probed where traffic goes: the live slot's port for blue-green.
    let port = live_port.unwrap_or(inv.app.port);
    let probes = join_all(facts_of.keys().map(|name| async move {
        let host = inv.host(name).expect("plan hosts come from inventory");
        let mut spec = HealthSpec::probe(&host.address, inv);
        spec.port = port;
        health
            .probe(sessions[name].as_ref(), &spec, PROBE_DEADLINE)
            .await
            .is_ok()
    }))
    .await;
    for ((name, facts), healthy) in facts_of.into_iter().zip(probes) {
        // A link's target is read back from the host: it must name a release by the release
        // rules before it may become a rollback target or reach a command.
        for (key, file) in [
            ("current", "current"),
            ("blue", "current-blue"),
            ("green", "current-green"),
        ] {
            if let Some(raw) = facts.get(key).filter(|c| !c.is_empty())
                && !is_release(&release_name(raw))
            {
                failures.push(HostFailure {
                    host: name.clone(),
                    step: "preflight".into(),
                    message: format!(
                        "{}/{file} points at {:?}, which is not a release by the release rules; point it at releases/<release> by hand",
                        inv.app.dir,
                        raw.chars().take(120).collect::<String>()
                    ),
                });
            }
        }
        let link = |key: &str| {
            facts
                .get(key)
                .filter(|c| !c.is_empty())
                .map(|c| release_name(c))
        };
        let release = match live_slot {
            Some(slot) if inv.strategy == Strategy::BlueGreen => link(slot.as_str()),
            _ => link("current"),
        };
        observation.hosts.insert(
            name.clone(),
            HostAtPreflight {
                release,
                healthy,
                in_pool: !down.contains(&name),
                blue: link("blue"),
                green: link("green"),
            },
        );
    }
    if failures.is_empty() {
        Ok(observation)
    } else {
        failures.sort_by(|a, b| a.host.cmp(&b.host));
        Err(Error::Preflight { failures })
    }
}

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

/// What the executor knows about each app host as it goes.
#[derive(Debug, Clone)]
struct HostState {
    release: Option<String>,
    /// The release it served when the rollout started.
    initial_release: Option<String>,
    progress: Progress,
    /// Whether this rollout may have moved `current`: rollback must then move it back.
    switched: bool,
    in_pool: bool,
    outcome: Option<HostOutcome>,
    note: Option<String>,
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
    /// The state last saved: the store's copy, updated from the hosts at every save.
    state: Mutex<Option<RolloutState>>,
    started: Instant,
    hosts: Mutex<BTreeMap<String, HostState>>,
    /// Load balancers whose pool state is unknown after a failed apply.
    unsure_balancers: Mutex<BTreeSet<String>>,
    failed_hosts: Mutex<usize>,
    /// Set once roller is restoring the fleet (rollback, undo, finishing an interrupted
    /// batch): from then on no wait may be cut short, or the clean-up itself would strand hosts.
    cleaning_up: std::sync::atomic::AtomicBool,
    /// Whether the batch in progress has started changing any load balancer's pool.
    pool_changed: std::sync::atomic::AtomicBool,
    /// Why the rollout ended the way it did, beyond the failure itself.
    notes: Mutex<Vec<String>>,
}

/// A failed step, before it is attributed to a batch.
#[derive(Debug)]
struct StepFailure {
    target: String,
    phase: PhaseName,
    message: String,
    role: Role,
    interrupted: bool,
}

/// Why a batch stopped before finishing.
enum BatchStop {
    Failed(StepFailure),
    /// The batch completed, but the next one may not leave the pool: its capacity check,
    /// run at the end of this batch, failed.
    NextRefused(StepFailure),
    /// Interrupted before `phase` (an index into the batch's phases) ran to completion.
    Interrupted {
        reason: String,
        phase: usize,
    },
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
}

impl<'a> Executor<'a> {
    pub fn new(input: ExecutorInput<'a>) -> Executor<'a> {
        let skipped: BTreeSet<&String> = input.plan.skipped.iter().map(|s| &s.host).collect();
        let hosts = input
            .plan
            .hosts
            .iter()
            .map(|h| {
                let seen = input.observed.hosts.get(&h.name);
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
                        outcome: skip.then_some(HostOutcome::Updated),
                        note: skip.then(|| "already on the release".to_string()),
                    },
                )
            })
            .collect();
        Executor {
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
            hosts: Mutex::new(hosts),
            unsure_balancers: Mutex::new(BTreeSet::new()),
            failed_hosts: Mutex::new(0),
            cleaning_up: std::sync::atomic::AtomicBool::new(false),
            pool_changed: std::sync::atomic::AtomicBool::new(false),
            notes: Mutex::new(Vec::new()),
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
                Ok(()) => {}
                Err(BatchStop::Interrupted { reason, phase }) => {
                    return Ok(self.finish_interrupted(reason, Some((batch, phase))).await);
                }
                Err(BatchStop::Failed(failure)) => {
                    return Ok(self.fail(index, batch, failure).await);
                }
                Err(BatchStop::NextRefused(failure)) => {
                    let next = next.expect("only a batch with a next one hands over");
                    return Ok(self.fail(index + 1, next, failure).await);
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

    /// Applies the failure policy to a failed batch (and, for rollback-all, earlier ones).
    async fn fail(&self, index: usize, batch: &Batch, failure: StepFailure) -> RolloutReport {
        self.start_cleanup();
        let at = FailureAt {
            batch: batch.number,
            failure: to_host_failure(failure),
        };
        match self.options.on_failure {
            FailurePolicy::Halt => {
                self.note(format!(
                    "--on-failure halt: batch {} was left as it is, out of the pool, for inspection",
                    batch.number
                ));
                let halted: Vec<String> = batch
                    .hosts
                    .iter()
                    .filter(|h| self.host(h).progress != Progress::Done || !self.host(h).in_pool)
                    .cloned()
                    .collect();
                self.set_outcome(&halted, HostOutcome::Halted);
            }
            FailurePolicy::RollbackBatch => {
                self.rollback(batch, None).await;
            }
            FailurePolicy::RollbackAll => {
                self.rollback(batch, None).await;
                for earlier in self.plan.batches[..index].iter().rev() {
                    if self.undo(earlier).await.is_err() {
                        self.note(format!(
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
    async fn finish_interrupted(
        &self,
        reason: String,
        at: Option<(&Batch, usize)>,
    ) -> RolloutReport {
        self.start_cleanup();
        if let Some((batch, phase)) = at {
            let remaining = &batch.phases[phase..];
            let handing_over = batch
                .return_alone
                .as_ref()
                .filter(|_| phase + 2 >= batch.phases.len());
            if let Some(alone) = handing_over {
                // Interrupted at the handover: this batch returns alone, the next stays in.
                self.note(format!(
                    "batch {} was completed rather than rolled back: its hosts were already healthy on the new release; the next batch was not started",
                    batch.number
                ));
                self.pool_changed
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                let alone = self.with_pool(alone, batch, &[]);
                if self
                    .run_phase(Some(batch.number), &alone, &BTreeSet::new())
                    .await
                    .is_ok()
                {
                    self.advance(batch, PhaseName::ReturnToPool, &BTreeSet::new());
                    self.set_outcome(&batch.hosts, HostOutcome::Updated);
                } else {
                    self.rollback(batch, None).await;
                }
            } else if remaining.len() == 1 && remaining[0].name == PhaseName::ReturnToPool {
                self.note(format!(
                    "batch {} was completed rather than rolled back: its hosts were already healthy on the new release, so returning them to the pool was one step where rolling back would have meant another restart",
                    batch.number
                ));
                let finished = self
                    .run_phase(Some(batch.number), &remaining[0], &BTreeSet::new())
                    .await;
                if finished.is_ok() {
                    self.set_outcome(&batch.hosts, HostOutcome::Updated);
                } else {
                    self.rollback(batch, None).await;
                }
            } else {
                self.note(format!(
                    "batch {} was rolled back: it was interrupted before its hosts were healthy on the new release",
                    batch.number
                ));
                self.rollback(batch, None).await;
            }
        }
        let report = self.report(None, Some(reason));
        self.save(journal_status(report.outcome)).await;
        report
    }

    async fn run_batch(
        &self,
        batch: &Batch,
        next: Option<&Batch>,
    ) -> std::result::Result<(), BatchStop> {
        // A batch taken out by the previous one's return has its pool changed already.
        self.pool_changed
            .store(batch.taken_out, std::sync::atomic::Ordering::SeqCst);
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
                });
            }
            let phase = if phase.name == PhaseName::ReturnToPool && !failed.is_empty() {
                // Hosts that failed alone (within --max-failed-hosts) go back to their previous
                // release before the batch returns; those that cannot stay out.
                let unrestored = self.rollback(batch, Some(&failed)).await;
                self.with_pool(phase, batch, &unrestored)
            } else {
                phase.clone()
            };
            let pool_phase = is_pool_phase(phase.name);
            let result = if pool_phase {
                // Set before the change: a failure midway leaves the pool unknown, and
                // rollback must then restore it.
                self.pool_changed
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                // Resume treats every step between leaving the pool and returning to it alike
                // (unfinished), so the summary is only written when the pool changes, and it is
                // written ahead, recording where this change leads, alongside the change
                // itself: resume checks each host's real state anyway, so either order is
                // safe, and the write costs no time of its own.
                self.advance(batch, phase.name, &failed);
                if handover.is_some_and(|h| index == h + 1)
                    && let Some(next) = next
                {
                    self.advance(next, PhaseName::RemoveFromPool, &BTreeSet::new());
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
                        });
                    }
                    if Some(index) == handover {
                        return Err(self.return_alone(batch, &failed, failures).await);
                    }
                    let tolerable = failures.iter().all(|f| f.role == Role::App);
                    let total = {
                        let mut n = self.failed_hosts.lock().expect("lock");
                        *n += failures.len();
                        *n
                    };
                    if !tolerable || total > self.options.max_failed_hosts {
                        return Err(BatchStop::Failed(
                            failures.into_iter().next().expect("at least one"),
                        ));
                    }
                    for f in failures {
                        self.set_note(
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
                self.advance(batch, phase.name, &failed);
            }
        }
        self.mark_updated(batch, &failed);
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
            self.rollback(batch, Some(failed)).await
        };
        let alone = self.with_pool(alone, batch, &unrestored);
        self.advance(batch, PhaseName::ReturnToPool, failed);
        let (result, ()) = tokio::join!(
            self.run_phase(Some(batch.number), &alone, failed),
            self.save(Status::Running)
        );
        let refused = refused.into_iter().next().expect("at least one");
        match result {
            Ok(()) => {
                self.mark_updated(batch, failed);
                // The next batch never left the pool: its rollback must not rewrite it.
                self.pool_changed
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                BatchStop::NextRefused(refused)
            }
            Err(failures) => BatchStop::Failed(failures.into_iter().next().expect("at least one")),
        }
    }

    /// Records how far the batch's hosts got once `phase` succeeded for them.
    fn advance(&self, batch: &Batch, phase: PhaseName, failed: &BTreeSet<String>) {
        let progress = match phase {
            PhaseName::RemoveFromPool | PhaseName::Drain => Progress::Drained,
            PhaseName::Switch => Progress::Switched,
            PhaseName::Restart | PhaseName::StartSlot => Progress::Restarted,
            PhaseName::HealthCheck | PhaseName::ReturnToPool | PhaseName::SwitchTraffic => {
                Progress::Done
            }
            _ => return,
        };
        for name in batch.hosts.iter().filter(|h| !failed.contains(*h)) {
            self.with_host(name, |h| h.progress = h.progress.max(progress));
        }
    }

    /// Brings hosts of a failed batch (all of them, or `only`) back to their previous release
    /// and into the pool. Returns the hosts that could not be restored: they stay out of the
    /// pool and are reported as failed.
    async fn rollback(&self, batch: &Batch, only: Option<&BTreeSet<String>>) -> Vec<String> {
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
            .filter(|h| !self.host(h).switched)
            .cloned()
            .collect();
        let mut excluded: BTreeSet<String> = never_switched.union(&outside).cloned().collect();
        // A batch whose pool was never changed (refused by the capacity guard, say) must not
        // have it rewritten on the way out either; one whose pool was changed always does.
        let pool_touched = self.pool_changed.load(std::sync::atomic::Ordering::SeqCst);
        let mut unrestored: Vec<String> = Vec::new();
        for phase in &batch.rollback {
            if is_pool_phase(phase.name) {
                if only.is_some() || !pool_touched {
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
                        self.note(format!(
                            "returning batch {} to the pool on {} failed: {}",
                            batch.number, f.target, f.message
                        ));
                    }
                }
                continue;
            }
            if let Err(failures) = self.run_phase(Some(batch.number), phase, &excluded).await {
                for f in failures {
                    self.set_note(
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
            self.with_host(name, |h| {
                h.progress = Progress::RolledBack;
                h.switched = false;
                if blue_green {
                    // Traffic is back on the slot that served before.
                    h.release = h.initial_release.clone();
                }
            });
        }
        for name in &unrestored {
            self.with_host(name, |h| h.progress = Progress::Failed);
        }
        self.set_outcome(&restored, HostOutcome::RolledBack);
        self.set_outcome(&unrestored, HostOutcome::Failed);
        self.save(Status::Running).await;
        unrestored
    }

    /// Takes a completed batch back to its previous release, draining it first.
    async fn undo(&self, batch: &Batch) -> std::result::Result<(), ()> {
        self.pool_changed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for name in &batch.hosts {
            self.with_host(name, |h| h.switched = true);
        }
        for phase in &batch.undo {
            if let Err(failures) = self
                .run_phase(Some(batch.number), phase, &BTreeSet::new())
                .await
            {
                for f in &failures {
                    self.set_note(&f.target, format!("undo {} failed: {}", f.phase, f.message));
                }
                // The batch may be out of the pool, half switched: the normal rollback
                // brings back what it can and reports the rest.
                self.rollback(batch, None).await;
                return Err(());
            }
        }
        for name in &batch.hosts {
            self.with_host(name, |h| {
                h.progress = Progress::RolledBack;
                h.switched = false;
            });
        }
        self.set_outcome(&batch.hosts, HostOutcome::RolledBack);
        self.save(Status::Running).await;
        Ok(())
    }

    /// The phase with its pool re-rendered: the batch's held-out hosts plus `failed` down.
    fn with_pool(&self, phase: &Phase, batch: &Batch, failed: &[String]) -> Phase {
        let mut phase = phase.clone();
        for step in &mut phase.steps {
            if let Action::SetPool { pool, content, .. } = &mut step.action {
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
                *content = self.balancer.render(pool);
            }
        }
        phase
    }

    async fn run_phase(
        &self,
        batch: Option<usize>,
        phase: &Phase,
        skip: &BTreeSet<String>,
    ) -> std::result::Result<(), Vec<StepFailure>> {
        let limit = Semaphore::new(if phase.name == PhaseName::Stage {
            STAGE_PARALLELISM
        } else {
            phase.steps.len().max(1)
        });
        let results = join_all(phase.steps.iter().map(|step| async {
            if skip.contains(&step.target) {
                self.emit(
                    batch,
                    phase.name,
                    &step.target,
                    StepState::Skipped,
                    None,
                    None,
                );
                return Ok(());
            }
            let _permit = limit.acquire().await.expect("semaphore is never closed");
            self.emit_step(batch, phase.name, step, StepState::Started, None, None);
            let started = Instant::now();
            let result = self.run_step(phase.name, step).await;
            let elapsed = Some(started.elapsed());
            match result {
                Ok(StepDone::Done) => {
                    self.emit_step(batch, phase.name, step, StepState::Succeeded, elapsed, None);
                    Ok(())
                }
                Ok(StepDone::Noted(note)) => {
                    self.emit_step(
                        batch,
                        phase.name,
                        step,
                        StepState::Succeeded,
                        elapsed,
                        Some(note.clone()),
                    );
                    self.note(format!("{} {}: {note}", step.target, phase.name));
                    Ok(())
                }
                Ok(StepDone::Skipped(why)) => {
                    self.emit_step(
                        batch,
                        phase.name,
                        step,
                        StepState::Skipped,
                        elapsed,
                        Some(why),
                    );
                    Ok(())
                }
                Err(StepError {
                    message,
                    interrupted,
                }) => {
                    self.emit_step(
                        batch,
                        phase.name,
                        step,
                        StepState::Failed,
                        elapsed,
                        Some(message.clone()),
                    );
                    Err(StepFailure {
                        target: step.target.clone(),
                        phase: phase.name,
                        message,
                        role: step.role,
                        interrupted,
                    })
                }
            }
        }))
        .await;
        let failures: Vec<StepFailure> = results.into_iter().filter_map(|r| r.err()).collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures)
        }
    }

    async fn run_step(
        &self,
        phase: PhaseName,
        step: &Step,
    ) -> std::result::Result<StepDone, StepError> {
        if let Action::CapacityCheck {
            staying,
            returning,
            min_healthy,
            path,
            port,
            expect_status,
        } = &step.action
        {
            return self
                .capacity_check(
                    staying,
                    returning,
                    *min_healthy,
                    path,
                    *port,
                    *expect_status,
                )
                .await
                .map_err(StepError::from);
        }
        let session = self
            .sessions
            .get(&step.target)
            .ok_or_else(|| format!("no session to {}", step.target))?;
        match &step.action {
            Action::Run { command } => {
                if phase == PhaseName::Switch || phase == PhaseName::SwitchBack {
                    // Marked before running: if the command's fate is unknown (a lost
                    // connection), rollback must assume `current` may have moved.
                    self.with_host(&step.target, |h| h.switched = phase == PhaseName::Switch);
                }
                let stdout = run(session.as_ref(), command, None, COMMAND_DEADLINE).await?;
                match phase {
                    PhaseName::Switch => {
                        let release = self.plan.targets.get(&step.target).cloned();
                        self.with_host(&step.target, |h| h.release = release);
                    }
                    PhaseName::SwitchBack => {
                        // Read back from the host's `.roller/previous`: known only if it is a
                        // release by the release rules.
                        let release = Some(release_name(stdout.trim())).filter(|r| is_release(r));
                        self.with_host(&step.target, |h| h.release = release);
                    }
                    _ => {}
                }
                Ok(StepDone::Done)
            }
            Action::Upload { check, upload } => {
                let artifact = self.plan.artifact.as_ref().ok_or("no artifact to upload")?;
                let present = run(session.as_ref(), check, None, COMMAND_DEADLINE).await?;
                if present.trim() == "present" {
                    return Ok(StepDone::Skipped("already holds the jar".into()));
                }
                let deadline = UPLOAD_FLOOR + Duration::from_secs(artifact.bytes / 5_000_000);
                run(
                    session.as_ref(),
                    upload,
                    Some(artifact.content.clone()),
                    deadline,
                )
                .await?;
                Ok(StepDone::Done)
            }
            Action::SetPool {
                pool,
                content,
                command,
            } => self
                .set_pool(&step.target, session.as_ref(), &pool.down, content, command)
                .await
                .map_err(StepError::from),
            Action::Drain {
                command,
                quiet,
                timeout,
            } => {
                // Drained means no connection for `quiet` in a row: a single sample of none
                // can fall between nginx accepting a request and connecting to the host.
                let started = Instant::now();
                let deadline = started + *timeout;
                let mut quiet_since: Option<Instant> = None;
                loop {
                    // Each poll ends by the drain's own deadline: `drain_timeout` bounds the
                    // whole wait, a slow host included.
                    let left = deadline.saturating_duration_since(Instant::now());
                    let out = run(session.as_ref(), command, None, left.min(COMMAND_DEADLINE))
                        .await
                        .map_err(|e| {
                            format!(
                                "no in-flight count within drain_timeout {}: {e}",
                                humantime::format_duration(*timeout)
                            )
                        })?;
                    let mut lines = out.lines();
                    let open: u64 = lines
                        .next()
                        .and_then(|l| l.trim().parse().ok())
                        .ok_or_else(|| format!("unexpected connection count {out:?}"))?;
                    let retiring: Option<u64> = lines.next().and_then(|l| l.trim().parse().ok());
                    let now = Instant::now();
                    // With no process left from before the pool change, everything that routes
                    // has the batch out of its pool: no connection to it can open again, so
                    // one sample of none is the drain, and the quiet window is not needed.
                    if open == 0 && retiring == Some(0) {
                        return Ok(StepDone::Done);
                    }
                    if open == 0 {
                        let since = *quiet_since.get_or_insert(now);
                        if now.duration_since(since) >= *quiet {
                            return Ok(StepDone::Done);
                        }
                    } else {
                        quiet_since = None;
                    }
                    if now + DRAIN_POLL > deadline {
                        let why = if open > 0 {
                            format!(
                                "{open} connection(s) from this load balancer to the batch still open"
                            )
                        } else {
                            format!(
                                "connections to the batch kept opening, never {} without one",
                                humantime::format_duration(*quiet)
                            )
                        };
                        return Err(format!(
                            "balancer.drain_timeout ({}) ended the wait, not the drain: {why}; \
                             connections of nginx workers from before a reload last until those \
                             workers exit, which worker_shutdown_timeout in nginx.conf bounds",
                            humantime::format_duration(*timeout)
                        )
                        .into());
                    }
                    self.pause(DRAIN_POLL).await?;
                }
            }
            Action::HealthCheck(spec) => {
                // Waiting for health changes nothing, so an interrupt may cut it short.
                tokio::select! {
                    biased;
                    result = self.health.wait_healthy(session.as_ref(), spec) => {
                        result.map(|()| StepDone::Done).map_err(StepError::from)
                    }
                    reason = self.interruption() => Err(StepError::interrupted(reason)),
                }
            }
            Action::Observe {
                access_log,
                hold,
                canary,
                weight,
                judgement,
            } => {
                let log = quote(access_log);
                let size = run(
                    session.as_ref(),
                    &format!(
                        "test -r {log} || {{ echo 'cannot read the access log '{log} >&2; exit 1; }}; wc -c < {log}"
                    ),
                    None,
                    COMMAND_DEADLINE,
                )
                .await?;
                let offset: u64 = size
                    .trim()
                    .parse()
                    .map_err(|_| format!("unexpected size of {access_log}: {size:?}"))?;
                self.pause(*hold).await?;
                // The tail is capped: a hold's worth of lines is what matters, not a day's.
                let text = run(
                    session.as_ref(),
                    &format!("tail -c +{} {log} | tail -c 16000000", offset + 1),
                    None,
                    COMMAND_DEADLINE,
                )
                .await?;
                let stats = canary::parse_log(&text);
                let servers: BTreeSet<String> = canary.iter().cloned().collect();
                match canary::judge(&stats, &servers, judgement) {
                    Ok(verdict) => Ok(StepDone::Noted(format!("at {weight}%: {verdict}"))),
                    Err(why) => Err(format!("canary at {weight}%: {why}").into()),
                }
            }
            Action::AwaitDecision { file } => {
                let promote = format!("promote {}", self.options.rollout_id);
                let abort = format!("abort {}", self.options.rollout_id);
                loop {
                    let said = run(
                        session.as_ref(),
                        &format!("cat {} 2>/dev/null; true", quote(file)),
                        None,
                        COMMAND_DEADLINE,
                    )
                    .await?;
                    match said.trim() {
                        s if s == promote => {
                            return Ok(StepDone::Noted("promoted with `roller promote`".into()));
                        }
                        s if s == abort => {
                            return Err("aborted with `roller abort`".into());
                        }
                        _ => self.pause(DECISION_POLL).await?,
                    }
                }
            }
            Action::CapacityCheck { .. } => unreachable!("handled above"),
        }
    }

    async fn set_pool(
        &self,
        target: &str,
        session: &dyn Transport,
        down: &BTreeSet<String>,
        content: &str,
        command: &str,
    ) -> std::result::Result<StepDone, String> {
        let result = session
            .exec(command, Some(content.to_string().into()), COMMAND_DEADLINE)
            .await;
        let mut unsure = self.unsure_balancers.lock().expect("lock");
        match result {
            Ok(out) if out.success() => {
                unsure.remove(target);
                drop(unsure);
                let mut hosts = self.hosts.lock().expect("hosts lock");
                for (name, state) in hosts.iter_mut() {
                    state.in_pool = !down.contains(name);
                }
                Ok(StepDone::Done)
            }
            Ok(out) if out.status == Some(APPLY_REJECTED) => Err(format!(
                "nginx refused the new upstream file, the old one was restored: {}",
                out.stderr_text()
            )),
            Ok(out) => {
                unsure.insert(target.to_string());
                Err(if out.status == Some(APPLY_UNCONFIRMED) {
                    format!("reload not confirmed: {}", out.stderr_text())
                } else {
                    describe_failure(&out)
                })
            }
            Err(e) => {
                unsure.insert(target.to_string());
                Err(e.to_string())
            }
        }
    }

    /// Refuses to take a batch out unless enough of the hosts staying in the pool answer
    /// their health check right now.
    async fn capacity_check(
        &self,
        staying: &[String],
        returning: &[String],
        min_healthy: usize,
        path: &str,
        port: u16,
        expect_status: u16,
    ) -> std::result::Result<StepDone, String> {
        let probes = join_all(staying.iter().map(|name| async move {
            let address = &self.plan.hosts.iter().find(|h| &h.name == name)?.address;
            let session = self.sessions.get(name)?;
            let spec = HealthSpec {
                address: address.clone(),
                port,
                path: path.to_string(),
                expect_status,
                interval: PROBE_DEADLINE,
                timeout: PROBE_DEADLINE,
                successes: 1,
            };
            let in_pool = self.host(name).in_pool || returning.contains(name);
            let healthy = self
                .health
                .probe(session.as_ref(), &spec, PROBE_DEADLINE)
                .await
                .is_ok();
            (in_pool && healthy).then(|| name.clone())
        }))
        .await;
        let healthy: Vec<String> = probes.into_iter().flatten().collect();
        if healthy.len() < min_healthy {
            return Err(format!(
                "only {} host(s) would stay healthy in the pool ({}), below balancer.min_healthy = {min_healthy}; the batch was not taken out",
                healthy.len(),
                if healthy.is_empty() {
                    "none".to_string()
                } else {
                    healthy.join(", ")
                }
            ));
        }
        Ok(StepDone::Done)
    }

    fn interrupted(&self) -> Option<String> {
        self.interrupt.borrow().clone()
    }

    fn start_cleanup(&self) {
        self.cleaning_up
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Resolves when the rollout is interrupted, unless roller is cleaning up (then never).
    async fn interruption(&self) -> String {
        if self.cleaning_up.load(std::sync::atomic::Ordering::SeqCst) {
            return std::future::pending().await;
        }
        let mut interrupt = self.interrupt.clone();
        wait_for_interrupt(&mut interrupt).await
    }

    /// Sleeps, unless interrupted first.
    async fn pause(&self, duration: Duration) -> std::result::Result<(), StepError> {
        tokio::select! {
            () = tokio::time::sleep(duration) => Ok(()),
            reason = self.interruption() => Err(StepError::interrupted(reason)),
        }
    }

    fn host(&self, name: &str) -> HostState {
        self.hosts.lock().expect("hosts lock")[name].clone()
    }

    fn with_host(&self, name: &str, f: impl FnOnce(&mut HostState)) {
        if let Some(state) = self.hosts.lock().expect("hosts lock").get_mut(name) {
            f(state);
        }
    }

    fn set_note(&self, name: &str, note: String) {
        self.with_host(name, |h| h.note = Some(note));
    }

    fn note(&self, note: String) {
        self.notes.lock().expect("notes lock").push(note);
    }

    /// Every host of the batch that did not fail now runs the release.
    fn mark_updated(&self, batch: &Batch, failed: &BTreeSet<String>) {
        for name in batch.hosts.iter().filter(|h| !failed.contains(*h)) {
            self.with_host(name, |h| h.outcome = Some(HostOutcome::Updated));
        }
    }

    fn set_outcome(&self, names: &[String], outcome: HostOutcome) {
        for name in names {
            self.with_host(name, |h| h.outcome = Some(outcome));
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

    /// Brings the rollout's state up to date with the hosts and hands it to the store.
    async fn save(&self, status: Status) {
        let Some(store) = self.store else {
            return;
        };
        let state = {
            let hosts = self.hosts.lock().expect("hosts lock");
            let mut state = self.state.lock().expect("state lock");
            let Some(state) = state.as_mut() else {
                return;
            };
            state.status = status;
            state.updated = journal::now_secs();
            state.hosts = hosts
                .iter()
                .map(|(name, h)| (name.clone(), h.progress))
                .collect();
            state.out_of_pool = hosts
                .iter()
                .filter(|(_, h)| !h.in_pool)
                .map(|(name, _)| name.clone())
                .collect();
            state.clone()
        };
        store.save(&state).await;
    }

    /// The rollout's state as last saved; `None` when it is kept nowhere.
    pub fn last_state(&self) -> Option<RolloutState> {
        self.state.lock().expect("state lock").clone()
    }

    fn report(&self, failure: Option<FailureAt>, interrupted: Option<String>) -> RolloutReport {
        let hosts = self.hosts.lock().expect("hosts lock");
        let unsure = self.unsure_balancers.lock().expect("lock");
        let reports: Vec<HostReport> = self
            .plan
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
                self.plan.upstream_file, self.plan.reload
            ));
        }
        for h in reports.iter().filter(|h| h.outcome == HostOutcome::Failed) {
            recovery.push(format!(
                "{}: not healthy after rollback ({}). It is marked `down` in {} on every load balancer. Once it answers its health check, run `{}` to put everyone back on the previous release and in the pool, or remove `down` from its line there and run `{}`",
                h.name,
                h.note.as_deref().unwrap_or("see the log above"),
                self.plan.upstream_file,
                self.options.recover_hint,
                self.plan.reload
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
                self.options.resume_hint,
                self.options.recover_hint
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
            release: self.plan.release.clone(),
            outcome,
            failure,
            interrupted,
            hosts: reports,
            notes: self.notes.lock().expect("notes lock").clone(),
            recovery,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

/// Phases that rewrite the load balancers' pool.
fn is_pool_phase(name: PhaseName) -> bool {
    matches!(
        name,
        PhaseName::RemoveFromPool
            | PhaseName::ReturnToPool
            | PhaseName::SwitchTraffic
            | PhaseName::SetWeight
    )
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

async fn wait_for_interrupt(interrupt: &mut Interrupt) -> String {
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

enum StepDone {
    Done,
    /// Done, with something the operator should read (a canary verdict).
    Noted(String),
    Skipped(String),
}

struct StepError {
    message: String,
    interrupted: bool,
}

impl StepError {
    fn interrupted(reason: String) -> StepError {
        StepError {
            message: format!("interrupted ({reason})"),
            interrupted: true,
        }
    }
}

impl From<String> for StepError {
    fn from(message: String) -> StepError {
        StepError {
            message,
            interrupted: false,
        }
    }
}

impl From<&str> for StepError {
    fn from(message: &str) -> StepError {
        StepError::from(message.to_string())
    }
}

/// Runs a command that must succeed and returns its stdout.
async fn run(
    session: &dyn Transport,
    command: &str,
    stdin: Option<bytes::Bytes>,
    deadline: Duration,
) -> std::result::Result<String, String> {
    let out = session
        .exec(command, stdin, deadline)
        .await
        .map_err(|e| e.to_string())?;
    if out.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(describe_failure(&out))
    }
}

fn describe_failure(out: &crate::transport::ExecOutput) -> String {
    let status = match out.status {
        Some(code) => format!("exit status {code}"),
        None => "killed or disconnected".to_string(),
    };
    let stderr = out.stderr_text();
    if stderr.is_empty() {
        status
    } else {
        format!("{status}: {stderr}")
    }
}

/// `releases/v2` → `v2`.
pub fn release_name(link: &str) -> String {
    link.trim()
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

fn to_host_failure(f: StepFailure) -> HostFailure {
    HostFailure {
        host: f.target,
        step: f.phase.to_string(),
        message: f.message,
    }
}
