//! `roller plan --commands`: every command exactly as it will run, the upstream file each load
//! balancer gets at each pool change (rendered from the step's pool the way the executor renders
//! it when it applies the change), and what runs instead on failure or interrupt. Written as it
//! goes: for a large fleet at a small batch this listing is far larger than the plan itself.

use std::io::{self, Write};

use super::{Action, Phase, Plan, Role, Sudo};
use crate::balancer::{Balancer, Pool};
use crate::health::HealthSpec;

impl Plan {
    /// Every command exactly as it will run, written to `to`.
    pub fn write_commands(&self, balancer: &dyn Balancer, to: &mut dyn Write) -> io::Result<()> {
        Listing {
            to,
            balancer,
            sudo: self.sudo,
        }
        .plan(self)
    }
}

struct Listing<'a> {
    to: &'a mut dyn Write,
    balancer: &'a dyn Balancer,
    /// Commands are shown as they are sent: through sudo on a side that says so.
    sudo: Sudo,
}

impl Listing<'_> {
    fn plan(&mut self, plan: &Plan) -> io::Result<()> {
        let out = &mut *self;
        writeln!(
            out.to,
            "\nCommands\n\nEach command runs on its host as `exec sh -c '<command>'`, whatever the SSH user's login shell."
        )?;
        for (on, side, key) in [
            (plan.sudo.app, "app hosts", "app.sudo"),
            (plan.sudo.balancer, "load balancers", "balancer.sudo"),
        ] {
            if on {
                writeln!(
                    out.to,
                    "On {side} ({key} = true) each command runs as root, as `sudo -n {} -c '<command>'`, shown so below; the deploy lock's and the rollout state's commands too.",
                    crate::remote::sudo::SHELL
                )?;
            }
        }
        writeln!(
            out.to,
            "Every pool change runs this on its load balancer, with the upstream file shown at the change on stdin:\n      $ {}",
            out.sudo.shown(Role::Balancer, &plan.set_pool_command)
        )?;
        out.phase("Pre-flight, before anything changes", &plan.preflight)?;
        out.phase(
            "Stage, in parallel, skipped where the jar is already present",
            &plan.stage,
        )?;
        let total = plan.batches.len();
        for batch in &plan.batches {
            writeln!(
                out.to,
                "\nBatch {} of {total}: {}",
                batch.number,
                batch.hosts.join(", ")
            )?;
            if !batch.held_out.is_empty() {
                writeln!(
                    out.to,
                    "  Held out of the pool until their own batch (unhealthy at pre-flight): {}",
                    batch.held_out.join(", ")
                )?;
            }
            if batch.taken_out {
                writeln!(
                    out.to,
                    "  Left the pool with batch {}'s return, in the same reload",
                    batch.number - 1
                )?;
            }
            for (i, phase) in batch.phases.iter().enumerate() {
                out.steps(&format!("{}. {}", i + 1, phase.name), phase)?;
            }
            if let Some(alone) = &batch.return_alone {
                writeln!(
                    out.to,
                    "  If the next batch may not leave the pool, or on interrupt before that, instead of the last two:"
                )?;
                out.steps("return-to-pool", alone)?;
            }
            writeln!(out.to, "  On failure, roll this batch back:")?;
            for (i, phase) in batch.rollback.iter().enumerate() {
                out.steps(&format!("R{}. {}", i + 1, phase.name), phase)?;
            }
            if !batch.undo.is_empty() {
                writeln!(
                    out.to,
                    "  With --on-failure rollback-all, after a later batch fails, undo this batch:"
                )?;
            }
            for (i, phase) in batch.undo.iter().enumerate() {
                out.steps(&format!("U{}. {}", i + 1, phase.name), phase)?;
            }
        }
        out.phase("Finish", &plan.finish)?;
        out.to.flush()
    }

    fn phase(&mut self, title: &str, phase: &Phase) -> io::Result<()> {
        writeln!(self.to, "\n{title}")?;
        self.steps(phase.name.as_str(), phase)
    }

    fn steps(&mut self, label: &str, phase: &Phase) -> io::Result<()> {
        if phase.steps.is_empty() {
            writeln!(self.to, "  {label}: nothing to do")?;
        }
        for step in &phase.steps {
            let who = match step.role {
                Role::App | Role::Fleet => step.target.clone(),
                Role::Balancer => format!("lb {}", step.target),
            };
            self.step(label, &who, step.role, &step.action)?;
        }
        Ok(())
    }

    fn step(&mut self, label: &str, who: &str, role: Role, action: &Action) -> io::Result<()> {
        let sudo = self.sudo;
        let sent = |command: &str| sudo.shown(role, command);
        let out = &mut self.to;
        match action {
            Action::Check { command }
            | Action::Switch { command, .. }
            | Action::SwitchBack { command }
            | Action::Restart { command }
            | Action::StartSlot { command, .. }
            | Action::StopSlot { command, .. }
            | Action::KeepOld { command }
            | Action::Prune { command } => {
                writeln!(out, "  {label} {who}\n      $ {}", sent(command))
            }
            Action::Hook { command, timeout } => writeln!(
                out,
                "  {label} {who}: at most {}\n      $ {}",
                humantime::format_duration(*timeout),
                sent(command)
            ),
            Action::Upload { check, upload } => writeln!(
                out,
                "  {label} {who}\n      $ {}\n      unless present, the jar on stdin to:\n      $ {}",
                sent(check),
                sent(upload)
            ),
            Action::SetPool { pool } => {
                writeln!(
                    out,
                    "  {label} {who} ({}), upstream file:",
                    pool_words(pool)
                )?;
                for line in self.balancer.render(pool).lines() {
                    writeln!(out, "      | {line}")?;
                }
                Ok(())
            }
            Action::Drain {
                command,
                quiet,
                timeout,
            } => writeln!(
                out,
                "  {label} {who}: until it prints 0 for {} in a row, at most {}\n      $ {}",
                humantime::format_duration(*quiet),
                humantime::format_duration(*timeout),
                sent(command)
            ),
            Action::HealthCheck(HealthSpec {
                address,
                port,
                path,
                expect_status,
                interval,
                timeout,
                successes,
                ..
            }) => writeln!(
                out,
                "  {label} {who}: GET http://{address}:{port}{path} from the host, expect {expect_status} {successes} time(s) in a row, every {}, at most {}",
                humantime::format_duration(*interval),
                humantime::format_duration(*timeout)
            ),
            Action::Observe {
                access_log,
                hold,
                canary,
                weight,
                judgement,
                measure,
                read,
            } => writeln!(
                out,
                "  {label} {who}: hold {} at {weight}% of the canary's share, then judge {} from {access_log}: abort above +{:.1} points of 5xx or {}x the others' mean upstream time, or below {} canary requests\n      $ {}\n      after the hold, the size it printed on stdin to:\n      $ {}",
                humantime::format_duration(*hold),
                canary.join(", "),
                judgement.max_error_rate_increase * 100.0,
                judgement.max_latency_ratio,
                judgement.min_requests,
                sent(measure),
                sent(read),
            ),
            Action::AwaitDecision { file, command } => writeln!(
                out,
                "  {label} {who}: wait for `roller promote` or `roller abort` (they write {file})\n      $ {}, every second",
                sent(command)
            ),
            Action::CapacityCheck {
                leaving,
                returning,
                min_healthy,
                path,
                port,
                expect_status,
            } => writeln!(
                out,
                "  {label}: at least {min_healthy} healthy (GET :{port}{path} = {expect_status}) among every host but {} while the {} is out{}",
                leaving.join(", "),
                if returning.is_empty() {
                    "batch"
                } else {
                    "next batch"
                },
                if returning.is_empty() {
                    String::new()
                } else {
                    format!(", {} counted as back in the pool", returning.join(", "))
                }
            ),
        }
    }
}

/// A pool in words: who is down, where traffic goes, and at what weight.
pub(super) fn pool_words(pool: &Pool) -> String {
    let mut words = if pool.down.is_empty() {
        "every host in the pool".to_string()
    } else {
        format!(
            "down: {}",
            pool.down.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    if let Some(port) = pool.port {
        words.push_str(&format!(", traffic to port {port}"));
    }
    for (host, weight) in &pool.weights {
        words.push_str(&format!(", {host} at {weight}% of its share"));
    }
    words
}
