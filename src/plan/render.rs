//! `roller plan` as an operator reads it: every command exactly as it will run, the upstream
//! file each load balancer gets, and what runs instead on failure or interrupt.

use super::{Action, Phase, Plan, Role, Sudo};
use crate::health::HealthSpec;

impl Plan {
    /// The plan as an operator reads it: every command exactly as it will run.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let artifact = match &self.artifact {
            Some(a) => format!(
                "{} ({} bytes, sha256 {})",
                a.path.display(),
                a.bytes,
                a.sha256
            ),
            None if self.kind == crate::journal::RunKind::Rollback => {
                "none: a rollback goes back to a release already on the hosts".into()
            }
            None => "not given: staging is left out of this plan".into(),
        };
        let kind = match self.kind {
            crate::journal::RunKind::Rollout => "release",
            crate::journal::RunKind::Rollback => "rollback to release",
        };
        out.push_str(&format!(
            "Plan: {} {kind} {} ({} strategy), {} host(s) in {} batch(es), {} load balancer(s)\nArtifact: {artifact}\n",
            self.app,
            self.release,
            serde_json::to_value(self.strategy).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            self.hosts.len(),
            self.batches.len(),
            self.balancers.len(),
        ));
        out.push_str(
            "Each command runs on its host as `exec sh -c '<command>'`, whatever the SSH user's login shell.\n",
        );
        for (on, side, key) in [
            (self.sudo.app, "app hosts", "app.sudo"),
            (self.sudo.balancer, "load balancers", "balancer.sudo"),
        ] {
            if on {
                out.push_str(&format!(
                    "On {side} ({key} = true) each command runs as root, as `sudo -n {} -c '<command>'`, shown so below; the deploy lock's and the rollout state's commands too.\n",
                    crate::remote::sudo::SHELL
                ));
            }
        }
        render_phase(
            &mut out,
            self.sudo,
            "Pre-flight, before anything changes",
            &self.preflight,
        );
        for s in &self.skipped {
            out.push_str(&format!("\nSkipped: {} ({})", s.host, s.reason));
        }
        if !self.skipped.is_empty() {
            out.push('\n');
        }
        render_phase(
            &mut out,
            self.sudo,
            "Stage, in parallel, skipped where the jar is already present",
            &self.stage,
        );
        for batch in &self.batches {
            out.push_str(&format!(
                "\nBatch {} of {}: {}\n",
                batch.number,
                self.batches.len(),
                batch.hosts.join(", ")
            ));
            if !batch.held_out.is_empty() {
                out.push_str(&format!(
                    "  Held out of the pool until their own batch (unhealthy at pre-flight): {}\n",
                    batch.held_out.join(", ")
                ));
            }
            if batch.taken_out {
                out.push_str(&format!(
                    "  Left the pool with batch {}'s return, in the same reload\n",
                    batch.number - 1
                ));
            }
            for (i, phase) in batch.phases.iter().enumerate() {
                render_steps(
                    &mut out,
                    self.sudo,
                    &format!("{}. {}", i + 1, phase.name),
                    phase,
                );
            }
            if let Some(alone) = &batch.return_alone {
                out.push_str(
                    "  If the next batch may not leave the pool, or on interrupt before that, instead of the last two:\n",
                );
                render_steps(&mut out, self.sudo, "return-to-pool", alone);
            }
            out.push_str("  On failure, roll this batch back:\n");
            for (i, phase) in batch.rollback.iter().enumerate() {
                render_steps(
                    &mut out,
                    self.sudo,
                    &format!("R{}. {}", i + 1, phase.name),
                    phase,
                );
            }
            if !batch.undo.is_empty() {
                out.push_str(
                    "  With --on-failure rollback-all, after a later batch fails, undo this batch:\n",
                );
            }
            for (i, phase) in batch.undo.iter().enumerate() {
                render_steps(
                    &mut out,
                    self.sudo,
                    &format!("U{}. {}", i + 1, phase.name),
                    phase,
                );
            }
        }
        render_phase(&mut out, self.sudo, "Finish", &self.finish);
        out
    }
}

fn render_phase(out: &mut String, sudo: Sudo, title: &str, phase: &Phase) {
    out.push_str(&format!("\n{title}\n"));
    render_steps(out, sudo, phase.name.as_str(), phase);
}

fn render_steps(out: &mut String, sudo: Sudo, label: &str, phase: &Phase) {
    if phase.steps.is_empty() {
        out.push_str(&format!("  {label}: nothing to do\n"));
    }
    for step in &phase.steps {
        let who = match step.role {
            Role::App | Role::Fleet => step.target.clone(),
            Role::Balancer => format!("lb {}", step.target),
        };
        // As sent: through sudo on a side that says so.
        let sent = |command: &str| sudo.shown(step.role, command);
        match &step.action {
            Action::Check { command }
            | Action::Switch { command, .. }
            | Action::SwitchBack { command }
            | Action::Restart { command }
            | Action::StartSlot { command, .. }
            | Action::StopSlot { command, .. }
            | Action::KeepOld { command }
            | Action::Prune { command } => {
                out.push_str(&format!("  {label} {who}\n      $ {}\n", sent(command)));
            }
            Action::Hook { command, timeout } => out.push_str(&format!(
                "  {label} {who}: at most {}\n      $ {command}\n",
                humantime::format_duration(*timeout)
            )),
            Action::Upload { check, upload } => out.push_str(&format!(
                "  {label} {who}\n      $ {}\n      unless present, the jar on stdin to:\n      $ {}\n",
                sent(check),
                sent(upload)
            )),
            Action::SetPool {
                pool,
                content,
                command,
            } => {
                let mut down = if pool.down.is_empty() {
                    "every host in the pool".to_string()
                } else {
                    format!("down: {}", pool.down.iter().cloned().collect::<Vec<_>>().join(", "))
                };
                if let Some(port) = pool.port {
                    down.push_str(&format!(", traffic to port {port}"));
                }
                for (host, weight) in &pool.weights {
                    down.push_str(&format!(", {host} at {weight}% of its share"));
                }
                out.push_str(&format!("  {label} {who} ({down}), upstream file:\n"));
                for line in content.lines() {
                    out.push_str(&format!("      | {line}\n"));
                }
                out.push_str(&format!("      $ {}\n", sent(command)));
            }
            Action::Drain {
                command,
                quiet,
                timeout,
            } => out.push_str(&format!(
                "  {label} {who}: until it prints 0 for {} in a row, at most {}\n      $ {}\n",
                humantime::format_duration(*quiet),
                humantime::format_duration(*timeout),
                sent(command)
            )),
            Action::HealthCheck(HealthSpec {
                address,
                port,
                path,
                expect_status,
                interval,
                timeout,
                successes,
                ..
            }) => out.push_str(&format!(
                "  {label} {who}: GET http://{address}:{port}{path} from the host, expect {expect_status} {successes} time(s) in a row, every {}, at most {}\n",
                humantime::format_duration(*interval),
                humantime::format_duration(*timeout)
            )),
            Action::Observe {
                access_log,
                hold,
                canary,
                weight,
                judgement,
                measure,
                read,
            } => out.push_str(&format!(
                "  {label} {who}: hold {} at {weight}% of the canary's share, then judge {} from {access_log}: abort above +{:.1} points of 5xx or {}x the others' mean upstream time, or below {} canary requests\n      $ {}\n      after the hold, the size it printed on stdin to:\n      $ {}\n",
                humantime::format_duration(*hold),
                canary.join(", "),
                judgement.max_error_rate_increase * 100.0,
                judgement.max_latency_ratio,
                judgement.min_requests,
                sent(measure),
                sent(read),
            )),
            Action::AwaitDecision { file, command } => out.push_str(&format!(
                "  {label} {who}: wait for `roller promote` or `roller abort` (they write {file})\n      $ {}, every second\n",
                sent(command)
            )),
            Action::CapacityCheck {
                staying,
                returning,
                min_healthy,
                path,
                port,
                expect_status,
            } => out.push_str(&format!(
                "  {label}: at least {min_healthy} of {} healthy (GET :{port}{path} = {expect_status}) while the {} is out{}\n",
                if staying.is_empty() { "(none)".to_string() } else { staying.join(", ") },
                if returning.is_empty() { "batch" } else { "next batch" },
                if returning.is_empty() {
                    String::new()
                } else {
                    format!(", {} counted as back in the pool", returning.join(", "))
                }
            )),
        }
    }
}
