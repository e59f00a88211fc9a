//! One function per action a plan step can take: run a command, upload the jar, change the
//! pool, wait for a drain or for health, judge a canary, wait for a decision, check capacity.
//! Each returns how the step ended; what that means for the batch is decided elsewhere.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{
    COMMAND_DEADLINE, DECISION_POLL, DRAIN_POLL, Executor, PROBE_DEADLINE, STAGE_PARALLELISM,
    release_name,
};
use crate::balancer::{APPLY_REJECTED, APPLY_UNCONFIRMED, Pool};
use crate::canary;
use crate::health::HealthSpec;
use crate::plan::{Action, Phase, Step, is_release};
use crate::report::StepState;
use crate::transport::Transport;

use super::step::{StepDone, StepError, StepFailure, run};

type StepResult = std::result::Result<StepDone, StepError>;

impl Executor<'_> {
    pub(super) async fn run_phase(
        &self,
        batch: Option<usize>,
        phase: &Phase,
        skip: &BTreeSet<String>,
    ) -> std::result::Result<(), Vec<StepFailure>> {
        let uploads = phase
            .steps
            .iter()
            .all(|s| matches!(s.action, Action::Upload { .. }));
        let limit = Semaphore::new(if uploads {
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
            let result = self.run_step(step).await;
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
                    self.ledger
                        .note(format!("{} {}: {note}", step.target, phase.name));
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
                Err(error) => {
                    let interrupted = error.is_interrupt();
                    let message = error.to_string();
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

    async fn run_step(&self, step: &Step) -> StepResult {
        if let Action::CapacityCheck {
            leaving,
            returning,
            min_healthy,
            path,
            port,
            expect_status,
        } = &step.action
        {
            return self
                .capacity_check(
                    leaving,
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
        let session = session.as_ref();
        match &step.action {
            Action::Check { command }
            | Action::Restart { command }
            | Action::StartSlot { command, .. }
            | Action::StopSlot { command, .. }
            | Action::KeepOld { command }
            | Action::Prune { command } => {
                run(session, command, None, COMMAND_DEADLINE).await?;
                Ok(StepDone::Done)
            }
            Action::Hook { command, timeout } => {
                run(session, command, None, *timeout).await?;
                Ok(StepDone::Done)
            }
            Action::Switch { release, command } => {
                self.switch(&step.target, session, release, command).await
            }
            Action::SwitchBack { command } => {
                self.switch_back(&step.target, session, command).await
            }
            Action::Upload { check, upload } => self.upload(session, check, upload).await,
            Action::SetPool { pool } => self.set_pool(&step.target, session, pool).await,
            Action::Drain {
                command,
                quiet,
                timeout,
            } => self.drain(session, command, *quiet, *timeout).await,
            Action::HealthCheck(spec) => self.wait_healthy(session, spec).await,
            Action::Observe { .. } => self.observe(session, &step.action).await,
            Action::AwaitDecision { command, .. } => self.await_decision(session, command).await,
            Action::CapacityCheck { .. } => unreachable!("handled above"),
        }
    }

    /// Moves the host's link to `release`. It counts as switched before the command runs: if
    /// the command's fate is unknown (a lost connection), rollback must assume it moved.
    async fn switch(
        &self,
        host: &str,
        session: &dyn Transport,
        release: &str,
        command: &str,
    ) -> StepResult {
        self.ledger.with_host(host, |h| h.switched = true);
        run(session, command, None, COMMAND_DEADLINE).await?;
        self.ledger
            .with_host(host, |h| h.release = Some(release.to_string()));
        Ok(StepDone::Done)
    }

    /// Moves the host's `current` back to the release it had before the last switch.
    async fn switch_back(&self, host: &str, session: &dyn Transport, command: &str) -> StepResult {
        self.ledger.with_host(host, |h| h.switched = false);
        let stdout = run(session, command, None, COMMAND_DEADLINE).await?;
        // Read back from the host's `.roller/previous`: known only if it is a release by the
        // release rules.
        let release = Some(release_name(stdout.trim())).filter(|r| is_release(r));
        self.ledger.with_host(host, |h| h.release = release);
        Ok(StepDone::Done)
    }

    /// Streams the jar to the host unless it already holds it with the right checksum.
    async fn upload(&self, session: &dyn Transport, check: &str, upload: &str) -> StepResult {
        let artifact = self.plan.artifact.as_ref().ok_or("no artifact to upload")?;
        let present = run(session, check, None, COMMAND_DEADLINE).await?;
        if present.trim() == "present" {
            return Ok(StepDone::Skipped("already holds the jar".into()));
        }
        let deadline = super::upload_deadline(artifact.bytes);
        run(session, upload, Some(artifact.content.clone()), deadline).await?;
        Ok(StepDone::Done)
    }

    /// Drained means no connection for `quiet` in a row: a single sample of none can fall
    /// between nginx accepting a request and connecting to the host.
    async fn drain(
        &self,
        session: &dyn Transport,
        command: &str,
        quiet: Duration,
        timeout: Duration,
    ) -> StepResult {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut quiet_since: Option<Instant> = None;
        loop {
            // Each poll ends by the drain's own deadline: `drain_timeout` bounds the
            // whole wait, a slow host included.
            let left = deadline.saturating_duration_since(Instant::now());
            let out = run(session, command, None, left.min(COMMAND_DEADLINE))
                .await
                .map_err(|e| {
                    format!(
                        "no in-flight count within drain_timeout {}: {e}",
                        humantime::format_duration(timeout)
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
                if now.duration_since(since) >= quiet {
                    return Ok(StepDone::Done);
                }
            } else {
                quiet_since = None;
            }
            if now + DRAIN_POLL > deadline {
                let why = if open > 0 {
                    format!("{open} connection(s) from this load balancer to the batch still open")
                } else {
                    format!(
                        "connections to the batch kept opening, never {} without one",
                        humantime::format_duration(quiet)
                    )
                };
                return Err(format!(
                    "balancer.drain_timeout ({}) ended the wait, not the drain: {why}; \
                     connections of nginx workers from before a reload last until those \
                     workers exit, which worker_shutdown_timeout in nginx.conf bounds",
                    humantime::format_duration(timeout)
                )
                .into());
            }
            self.pause(DRAIN_POLL).await?;
        }
    }

    async fn wait_healthy(&self, session: &dyn Transport, spec: &HealthSpec) -> StepResult {
        // Waiting for health changes nothing, so an interrupt may cut it short.
        tokio::select! {
            biased;
            result = self.health.wait_healthy(session, spec) => {
                result.map(|()| StepDone::Done).map_err(StepError::from)
            }
            reason = self.interruption() => Err(StepError::interrupted(reason)),
        }
    }

    /// Holds the canary at `weight`, then judges it from the access log lines written meanwhile.
    async fn observe(&self, session: &dyn Transport, observe: &Action) -> StepResult {
        let Action::Observe {
            access_log,
            hold,
            canary,
            weight,
            judgement,
            measure,
            read,
        } = observe
        else {
            unreachable!("only an observe step is observed")
        };
        let size = run(session, measure, None, COMMAND_DEADLINE).await?;
        let offset: u64 = size
            .trim()
            .parse()
            .map_err(|_| format!("unexpected size of {access_log}: {size:?}"))?;
        self.pause(*hold).await?;
        let text = run(
            session,
            read,
            Some(format!("{offset}\n").into()),
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

    /// Polls the decision file until `roller promote` or `roller abort` named this rollout.
    async fn await_decision(&self, session: &dyn Transport, command: &str) -> StepResult {
        let promote = format!("promote {}", self.options.rollout_id);
        let abort = format!("abort {}", self.options.rollout_id);
        loop {
            let said = run(session, command, None, COMMAND_DEADLINE).await?;
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

    /// Installs a pool on one load balancer, its file rendered now rather than kept in the
    /// plan for every step. A refused file changed nothing; any other failure leaves that load
    /// balancer's pool unknown, for the report to say.
    async fn set_pool(&self, target: &str, session: &dyn Transport, pool: &Pool) -> StepResult {
        let content = self.balancer.render(pool);
        let result = session
            .exec(
                &self.plan.set_pool_command,
                Some(content.into()),
                COMMAND_DEADLINE,
            )
            .await;
        match result {
            Ok(out) if out.success() => {
                self.ledger.pool_applied(target, &pool.down);
                Ok(StepDone::Done)
            }
            Ok(out) if out.status == Some(APPLY_REJECTED) => Err(StepError::Rejected(format!(
                "nginx refused the new upstream file, the old one was restored: {}",
                out.stderr_text()
            ))),
            Ok(out) => {
                self.ledger.pool_unknown(target);
                Err(if out.status == Some(APPLY_UNCONFIRMED) {
                    StepError::Rejected(format!("reload not confirmed: {}", out.stderr_text()))
                } else {
                    StepError::failed(&out)
                })
            }
            Err(e) => {
                self.ledger.pool_unknown(target);
                Err(e.into())
            }
        }
    }

    /// Refuses to take a batch out unless enough of the hosts staying in the pool (every host
    /// of the plan but those `leaving`) answer their health check right now.
    async fn capacity_check(
        &self,
        leaving: &[String],
        returning: &[String],
        min_healthy: usize,
        path: &str,
        port: u16,
        expect_status: u16,
    ) -> std::result::Result<StepDone, String> {
        let staying = self
            .plan
            .hosts
            .iter()
            .filter(|h| !leaving.contains(&h.name));
        let probes = join_all(staying.map(|host| async move {
            let (name, address) = (&host.name, &host.address);
            let session = self.sessions.get(name)?;
            let spec = HealthSpec {
                address: address.clone(),
                port,
                path: path.to_string(),
                expect_status,
                interval: PROBE_DEADLINE,
                timeout: PROBE_DEADLINE,
                successes: 1,
                command: self.plan.health_command.clone(),
            };
            let in_pool = self.ledger.host(name).in_pool || returning.contains(name);
            if !in_pool {
                return Some(Err(format!("{name}: out of the pool")));
            }
            Some(
                self.health
                    .probe(session.as_ref(), &spec, PROBE_DEADLINE)
                    .await
                    .map(|()| name.clone())
                    .map_err(|e| format!("{name}: {e}")),
            )
        }))
        .await;
        let (healthy, why_not): (Vec<_>, Vec<_>) =
            probes.into_iter().flatten().partition(Result::is_ok);
        let healthy: Vec<String> = healthy.into_iter().flatten().collect();
        if healthy.len() < min_healthy {
            // Why the others do not count is what the operator needs to act on.
            let why_not: Vec<String> = why_not.into_iter().filter_map(Result::err).collect();
            return Err(format!(
                "only {} host(s) would stay healthy in the pool ({}), below balancer.min_healthy = {min_healthy}; the batch was not taken out{}",
                healthy.len(),
                if healthy.is_empty() {
                    "none".to_string()
                } else {
                    healthy.join(", ")
                },
                if why_not.is_empty() {
                    String::new()
                } else {
                    format!("; not counted: {}", why_not.join("; "))
                }
            ));
        }
        Ok(StepDone::Done)
    }
}
