//! Runs a [`Plan`] over transports: the only place where roller changes anything on a host.
//!
//! Phases run in order and the steps of a phase run concurrently. When a batch phase fails the
//! rest of the batch is abandoned and its rollback phases run instead, so the fleet always ends
//! in a state the final report can describe host by host.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::balancer::{APPLY_REJECTED, APPLY_UNCONFIRMED, Balancer, Pool};
use crate::error::{Error, HostFailure, Result};
use crate::health::{HealthCheck, HealthSpec};
use crate::plan::{Action, Batch, Phase, PhaseName, Plan, Step};
use crate::report::{
    Event, FailureAt, HostOutcome, HostReport, Outcome, Reporter, RolloutReport, StepState,
};
use crate::transport::{Connector, Endpoint, Transport};

/// How long a single remote command may take, restart included (a JVM service may take a
/// while to stop gracefully).
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(300);
/// Uploads are bounded by size: a floor plus a pessimistic 5 MB/s.
const UPLOAD_FLOOR: Duration = Duration::from_secs(60);
/// Parallel uploads during staging: enough to fill a link, few enough not to starve it.
const STAGE_PARALLELISM: usize = 4;
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// Open sessions, keyed by plan target (app host name or load-balancer address).
pub type Sessions = HashMap<String, Arc<dyn Transport>>;

/// Opens one session per app host and load balancer, all at once. Any failure is a pre-flight
/// failure: nothing has been changed yet.
pub async fn connect(plan: &Plan, ssh_port: u16, connector: &dyn Connector) -> Result<Sessions> {
    let mut endpoints: Vec<Endpoint> = plan
        .hosts
        .iter()
        .map(|h| Endpoint {
            name: h.name.clone(),
            address: h.address.clone(),
            port: ssh_port,
        })
        .collect();
    endpoints.extend(plan.balancers.iter().map(|lb| Endpoint {
        name: lb.clone(),
        address: lb.clone(),
        port: ssh_port,
    }));
    let results = join_all(endpoints.iter().map(|e| connector.connect(e))).await;
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

/// What the executor knows about each app host as it goes.
#[derive(Debug, Clone, Default)]
struct HostState {
    release: Option<String>,
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
    sessions: Sessions,
    reporter: Arc<dyn Reporter>,
    started: Instant,
    hosts: Mutex<BTreeMap<String, HostState>>,
    /// Load balancers whose pool state is unknown after a failed apply.
    unsure_balancers: Mutex<BTreeSet<String>>,
}

/// A failed step, before it is attributed to a batch.
struct StepFailure {
    target: String,
    phase: PhaseName,
    message: String,
}

impl<'a> Executor<'a> {
    pub fn new(
        plan: &'a Plan,
        balancer: &'a dyn Balancer,
        health: &'a dyn HealthCheck,
        sessions: Sessions,
        reporter: Arc<dyn Reporter>,
    ) -> Executor<'a> {
        let hosts = plan
            .hosts
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    HostState {
                        in_pool: true,
                        ..HostState::default()
                    },
                )
            })
            .collect();
        Executor {
            plan,
            balancer,
            health,
            sessions,
            reporter,
            started: Instant::now(),
            hosts: Mutex::new(hosts),
            unsure_balancers: Mutex::new(BTreeSet::new()),
        }
    }

    /// Runs the whole plan. `Err` means nothing was changed (pre-flight or staging failed);
    /// `Ok` carries the report of a rollout that changed the fleet, successful or not.
    pub async fn run(&self) -> Result<RolloutReport> {
        self.run_preflight().await?;
        self.run_stage().await?;
        for batch in &self.plan.batches {
            if let Err(failure) = self.run_batch(batch).await {
                self.rollback(batch).await;
                return Ok(self.report(Some(FailureAt {
                    batch: batch.number,
                    failure: HostFailure {
                        host: failure.target,
                        step: failure.phase.to_string(),
                        message: failure.message,
                    },
                })));
            }
            self.set_outcome(&batch.hosts, HostOutcome::Updated);
        }
        // Pruning is housekeeping: a failure is reported but does not fail the rollout.
        let _ = self
            .run_phase(None, &self.plan.finish, &BTreeSet::new())
            .await;
        Ok(self.report(None))
    }

    pub async fn close(&self) {
        join_all(self.sessions.values().map(|s| s.close())).await;
    }

    async fn run_preflight(&self) -> Result<()> {
        let outputs = Mutex::new(HashMap::new());
        let failures = match self
            .run_phase_collect(None, &self.plan.preflight, &BTreeSet::new(), &outputs)
            .await
        {
            Ok(()) => Vec::new(),
            Err(fs) => fs,
        };
        let mut failures: Vec<HostFailure> = failures.into_iter().map(to_host_failure).collect();
        let outputs = outputs.into_inner().expect("outputs lock");
        let mut hosts = self.hosts.lock().expect("hosts lock");
        for (target, stdout) in outputs {
            let facts: HashMap<&str, &str> =
                stdout.lines().filter_map(|l| l.split_once('=')).collect();
            if let Some(state) = hosts.get_mut(&target) {
                state.release = facts
                    .get("current")
                    .filter(|c| !c.is_empty())
                    .map(|c| release_name(c));
            }
            let free_kb: Option<u64> = facts.get("free_kb").and_then(|f| f.parse().ok());
            if let (Some(free_kb), Some(artifact)) = (free_kb, &self.plan.artifact) {
                // Room for the partial upload and the final file side by side would be twice
                // the jar; a margin on top keeps the host from filling its disk.
                let needed_kb = artifact.bytes.div_ceil(1024) * 2 + 10 * 1024;
                if free_kb < needed_kb {
                    failures.push(HostFailure {
                        host: target.clone(),
                        step: "preflight".into(),
                        message: format!(
                            "not enough disk: {free_kb} KiB free, the jar needs {needed_kb} KiB"
                        ),
                    });
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            failures.sort_by(|a, b| a.host.cmp(&b.host));
            Err(Error::Preflight { failures })
        }
    }

    async fn run_stage(&self) -> Result<()> {
        self.run_phase(None, &self.plan.stage, &BTreeSet::new())
            .await
            .map_err(|failures| Error::Preflight {
                failures: failures.into_iter().map(to_host_failure).collect(),
            })
    }

    async fn run_batch(&self, batch: &Batch) -> std::result::Result<(), StepFailure> {
        for phase in &batch.phases {
            self.run_phase(Some(batch.number), phase, &BTreeSet::new())
                .await
                .map_err(|mut failures| failures.remove(0))?;
        }
        Ok(())
    }

    /// Brings every host of a failed batch back to its previous release and into the pool.
    /// A host that cannot be restored stays out of the pool and is reported as failed.
    async fn rollback(&self, batch: &Batch) {
        let mut excluded: BTreeSet<String> = {
            let hosts = self.hosts.lock().expect("hosts lock");
            batch
                .hosts
                .iter()
                .filter(|h| !hosts[*h].switched)
                .cloned()
                .collect()
        };
        let never_switched = excluded.clone();
        for phase in &batch.rollback {
            let phase = if phase.name == PhaseName::ReturnToPool {
                // Only hosts that were restored go back; the rest stay marked down.
                let failed: Vec<String> = excluded.difference(&never_switched).cloned().collect();
                self.set_pool_phase(phase, &failed)
            } else {
                phase.clone()
            };
            let skip = if phase.name == PhaseName::ReturnToPool {
                BTreeSet::new()
            } else {
                excluded.clone()
            };
            if let Err(failures) = self.run_phase(Some(batch.number), &phase, &skip).await {
                for f in failures {
                    if phase.name != PhaseName::ReturnToPool {
                        self.note(
                            &f.target,
                            format!("rollback {} failed: {}", f.phase, f.message),
                        );
                        excluded.insert(f.target);
                    }
                }
            }
        }
        let restored: Vec<String> = batch
            .hosts
            .iter()
            .filter(|h| !excluded.contains(*h) || never_switched.contains(*h))
            .cloned()
            .collect();
        self.set_outcome(&restored, HostOutcome::RolledBack);
        let failed: Vec<String> = batch
            .hosts
            .iter()
            .filter(|h| !restored.contains(h))
            .cloned()
            .collect();
        self.set_outcome(&failed, HostOutcome::Failed);
    }

    fn set_pool_phase(&self, phase: &Phase, down: &[String]) -> Phase {
        let content = self.balancer.render(&Pool::with_down(down));
        let mut phase = phase.clone();
        for step in &mut phase.steps {
            if let Action::SetPool {
                down: d,
                content: c,
                ..
            } = &mut step.action
            {
                *d = down.to_vec();
                *c = content.clone();
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
        self.run_phase_collect(batch, phase, skip, &Mutex::new(HashMap::new()))
            .await
    }

    async fn run_phase_collect(
        &self,
        batch: Option<usize>,
        phase: &Phase,
        skip: &BTreeSet<String>,
        outputs: &Mutex<HashMap<String, String>>,
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
            self.emit(
                batch,
                phase.name,
                &step.target,
                StepState::Started,
                None,
                None,
            );
            let started = Instant::now();
            let result = self.run_step(phase.name, step).await;
            let elapsed = Some(started.elapsed());
            match result {
                Ok(StepDone::Done(stdout)) => {
                    self.emit(
                        batch,
                        phase.name,
                        &step.target,
                        StepState::Succeeded,
                        elapsed,
                        None,
                    );
                    outputs
                        .lock()
                        .expect("outputs lock")
                        .insert(step.target.clone(), stdout);
                    Ok(())
                }
                Ok(StepDone::Skipped(why)) => {
                    self.emit(
                        batch,
                        phase.name,
                        &step.target,
                        StepState::Skipped,
                        elapsed,
                        Some(why),
                    );
                    Ok(())
                }
                Err(message) => {
                    self.emit(
                        batch,
                        phase.name,
                        &step.target,
                        StepState::Failed,
                        elapsed,
                        Some(message.clone()),
                    );
                    Err(StepFailure {
                        target: step.target.clone(),
                        phase: phase.name,
                        message,
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
    ) -> std::result::Result<StepDone, String> {
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
                    PhaseName::Switch => self.with_host(&step.target, |h| {
                        h.release = Some(self.plan.release.clone());
                    }),
                    PhaseName::SwitchBack => {
                        let release = release_name(stdout.trim());
                        self.with_host(&step.target, |h| h.release = Some(release));
                    }
                    _ => {}
                }
                Ok(StepDone::Done(stdout))
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
                .await
                .map(StepDone::Done)
            }
            Action::SetPool {
                down,
                content,
                command,
            } => {
                let result = session
                    .exec(command, Some(content.clone().into()), COMMAND_DEADLINE)
                    .await;
                let in_pool = |name: &String| !down.contains(name);
                match result {
                    Ok(out) if out.success() => {
                        self.unsure_balancers
                            .lock()
                            .expect("lock")
                            .remove(&step.target);
                        let mut hosts = self.hosts.lock().expect("hosts lock");
                        for (name, state) in hosts.iter_mut() {
                            state.in_pool = in_pool(name);
                        }
                        Ok(StepDone::Done(String::new()))
                    }
                    Ok(out) if out.status == Some(APPLY_REJECTED) => Err(format!(
                        "nginx refused the new upstream file, the old one was restored: {}",
                        out.stderr_text()
                    )),
                    Ok(out) => {
                        self.unsure_balancers
                            .lock()
                            .expect("lock")
                            .insert(step.target.clone());
                        Err(if out.status == Some(APPLY_UNCONFIRMED) {
                            format!("reload not confirmed: {}", out.stderr_text())
                        } else {
                            describe_failure(&out)
                        })
                    }
                    Err(e) => {
                        self.unsure_balancers
                            .lock()
                            .expect("lock")
                            .insert(step.target.clone());
                        Err(e.to_string())
                    }
                }
            }
            Action::Drain { command, timeout } => {
                let deadline = Instant::now() + *timeout;
                loop {
                    let out = run(session.as_ref(), command, None, COMMAND_DEADLINE).await?;
                    let in_flight: u64 = out
                        .trim()
                        .parse()
                        .map_err(|_| format!("unexpected in-flight count {out:?}"))?;
                    if in_flight == 0 {
                        return Ok(StepDone::Done(String::new()));
                    }
                    if Instant::now() + DRAIN_POLL > deadline {
                        return Err(format!(
                            "{in_flight} request(s) still in flight after {}",
                            humantime::format_duration(*timeout)
                        ));
                    }
                    tokio::time::sleep(DRAIN_POLL).await;
                }
            }
            Action::HealthCheck {
                address,
                port,
                path,
                expect_status,
                interval,
                timeout,
                successes,
            } => {
                let spec = HealthSpec {
                    address: address.clone(),
                    port: *port,
                    path: path.clone(),
                    expect_status: *expect_status,
                    interval: *interval,
                    timeout: *timeout,
                    successes: *successes,
                };
                self.health
                    .wait_healthy(session.as_ref(), &spec)
                    .await
                    .map(|()| StepDone::Done(String::new()))
            }
        }
    }

    fn with_host(&self, name: &str, f: impl FnOnce(&mut HostState)) {
        if let Some(state) = self.hosts.lock().expect("hosts lock").get_mut(name) {
            f(state);
        }
    }

    fn note(&self, name: &str, note: String) {
        self.with_host(name, |h| h.note = Some(note));
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
            batch,
            phase,
            target: target.to_string(),
            state,
            elapsed_ms: elapsed.map(|e| e.as_millis() as u64),
            message,
        });
    }

    fn report(&self, failure: Option<FailureAt>) -> RolloutReport {
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
                self.plan.upstream_file,
                self.plan.reload
            ));
        }
        for h in reports.iter().filter(|h| h.outcome == HostOutcome::Failed) {
            recovery.push(format!(
                "{}: not healthy after rollback ({}). It is marked `down` in {} on every load balancer. Once it answers its health check, remove `down` from its line there and run `{}`",
                h.name,
                h.note.as_deref().unwrap_or("see the log above"),
                self.plan.upstream_file,
                self.plan.reload
            ));
        }
        let outcome = match (&failure, recovery.is_empty()) {
            (None, true) => Outcome::Succeeded,
            (_, false) => Outcome::RollbackIncomplete,
            (Some(_), true) => Outcome::RolledBack,
        };
        RolloutReport {
            release: self.plan.release.clone(),
            outcome,
            failure,
            hosts: reports,
            recovery,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

enum StepDone {
    Done(String),
    Skipped(String),
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
fn release_name(link: &str) -> String {
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
