//! A rollout computed in full before it starts: batches of phases of steps, each step an exact
//! remote command. `roller plan` prints this object and `roller rollout` executes it, so what
//! an operator reviews is what runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::balancer::{Balancer, Pool};
use crate::error::{Error, Result};
use crate::inventory::{Host, Inventory, human, is_word};
use crate::remote;

/// The jar to roll out, read once: its bytes are uploaded to every host from memory.
#[derive(Debug, Clone, Serialize)]
pub struct Artifact {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    #[serde(skip)]
    pub content: bytes::Bytes,
}

impl Artifact {
    /// Reads and checks the jar: a regular, non-empty file that is a zip archive, as every jar is.
    pub fn load(path: &Path) -> Result<Artifact> {
        let fail = |message: String| Error::Artifact {
            path: path.to_path_buf(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        if !meta.is_file() {
            return Err(fail("is not a regular file".into()));
        }
        let content = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        if content.is_empty() {
            return Err(fail("is empty".into()));
        }
        if !content.starts_with(b"PK\x03\x04") {
            return Err(fail("is not a jar (no zip header)".into()));
        }
        let sha256 = hex::encode(Sha256::digest(&content));
        Ok(Artifact {
            path: path.to_path_buf(),
            sha256,
            bytes: content.len() as u64,
            content: content.into(),
        })
    }

    /// A release name that changes whenever the jar does: `<file stem>-<first 12 of sha256>`.
    pub fn default_release(&self) -> String {
        let stem: String = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let stem = stem.trim_start_matches('.');
        let stem = if stem.is_empty() { "release" } else { stem };
        format!("{stem}-{}", &self.sha256[..12])
    }
}

/// Checks a release name given with `--release`: it becomes a directory name on every host.
pub fn validate_release(release: &str) -> Result<()> {
    if !is_word(release) || release.starts_with('.') || release.len() > 64 {
        return Err(Error::Usage {
            flag: "--release".into(),
            message: format!(
                "{release:?} must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
            ),
        });
    }
    Ok(())
}

/// `--batch`: how many hosts leave the pool at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Hosts(usize),
    Percent(u8),
}

impl std::str::FromStr for BatchSize {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a host count (2) or a percentage (25%)");
        if let Some(p) = s.strip_suffix('%') {
            let p: u8 = p.trim().parse().map_err(|_| bad())?;
            if p == 0 || p > 100 {
                return Err(format!("{s:?}: a percentage must be between 1% and 100%"));
            }
            Ok(BatchSize::Percent(p))
        } else {
            let n: usize = s.trim().parse().map_err(|_| bad())?;
            if n == 0 {
                return Err("a batch needs at least one host".into());
            }
            Ok(BatchSize::Hosts(n))
        }
    }
}

impl BatchSize {
    pub fn hosts_per_batch(self, total: usize) -> usize {
        match self {
            BatchSize::Hosts(n) => n.min(total),
            BatchSize::Percent(p) => (total * p as usize).div_ceil(100).max(1),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub app: String,
    pub release: String,
    pub strategy: &'static str,
    pub artifact: Option<Artifact>,
    pub hosts: Vec<Host>,
    pub balancers: Vec<String>,
    /// Where the pool lives on each load balancer, and how to apply it by hand.
    pub upstream_file: String,
    pub reload: String,
    /// Run on every host and load balancer before anything changes.
    pub preflight: Phase,
    /// Hosts left out of every batch, and why (already on the release and healthy).
    pub skipped: Vec<Skipped>,
    /// The release each host in a batch is switched to.
    pub targets: BTreeMap<String, String>,
    /// Uploads to every host in parallel, before the first batch leaves the pool.
    pub stage: Phase,
    pub batches: Vec<Batch>,
    /// Housekeeping once every batch is done.
    pub finish: Phase,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub host: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Batch {
    pub number: usize,
    pub hosts: Vec<String>,
    /// Hosts outside this batch that stay out of the pool while it runs: unhealthy at
    /// pre-flight and waiting for a later batch to fix them.
    pub held_out: Vec<String>,
    pub phases: Vec<Phase>,
    /// Run instead of the remaining phases when one of them fails. Steps of a host that never
    /// reached `switch` are skipped: it is still on its previous release.
    pub rollback: Vec<Phase>,
    /// Takes this batch, once completed, back to its previous release (`--on-failure
    /// rollback-all`), with the same care as going forward.
    pub undo: Vec<Phase>,
}

/// Steps that run concurrently; the next phase starts when all of them succeeded.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: PhaseName,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseName {
    Preflight,
    Stage,
    CapacityCheck,
    RemoveFromPool,
    Drain,
    Switch,
    Restart,
    HealthCheck,
    ReturnToPool,
    SwitchBack,
    Prune,
}

impl PhaseName {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseName::Preflight => "preflight",
            PhaseName::Stage => "stage",
            PhaseName::CapacityCheck => "capacity-check",
            PhaseName::RemoveFromPool => "remove-from-pool",
            PhaseName::Drain => "drain",
            PhaseName::Switch => "switch",
            PhaseName::Restart => "restart",
            PhaseName::HealthCheck => "health-check",
            PhaseName::ReturnToPool => "return-to-pool",
            PhaseName::SwitchBack => "switch-back",
            PhaseName::Prune => "prune",
        }
    }
}

impl std::fmt::Display for PhaseName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One action on one machine: an app host (by inventory name) or a load balancer (by address).
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub target: String,
    pub role: Role,
    pub action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    App,
    Balancer,
    /// A check across hosts, run by the controller over their sessions.
    Fleet,
}

/// The fleet-wide capacity guard's target name in events and reports.
pub const FLEET: &str = "fleet";

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Action {
    /// Must exit 0. Output is kept for the report (pre-flight facts, pruned releases).
    Run { command: String },
    /// `check` prints `present` when the host already holds the jar; otherwise the jar is
    /// streamed to `upload` on stdin.
    Upload { check: String, upload: String },
    /// `content` goes to `command` on stdin; `down` is the pool it encodes.
    SetPool {
        down: Vec<String>,
        content: String,
        command: String,
    },
    /// Polls `command` until it prints 0 (requests in flight to the batch).
    Drain {
        command: String,
        #[serde(with = "human")]
        timeout: Duration,
    },
    /// Polls `GET path` on the host, made from the host itself through the SSH connection.
    HealthCheck {
        address: String,
        port: u16,
        path: String,
        expect_status: u16,
        #[serde(with = "human")]
        interval: Duration,
        #[serde(with = "human")]
        timeout: Duration,
        successes: u32,
    },
    /// Probes every host that stays in the pool once; fails when fewer than `min_healthy`
    /// answer healthy.
    CapacityCheck {
        staying: Vec<String>,
        min_healthy: usize,
        path: String,
        port: u16,
        expect_status: u16,
    },
}

/// A host as pre-flight found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Observed {
    pub release: Option<String>,
    pub healthy: bool,
    pub in_pool: bool,
}

pub struct PlanInput<'a> {
    pub inventory: &'a Inventory,
    pub balancer: &'a dyn Balancer,
    pub release: String,
    pub artifact: Option<Artifact>,
    pub batch: BatchSize,
    /// What pre-flight found; `None` for `roller plan`, which touches no host.
    pub observed: Option<&'a BTreeMap<String, Observed>>,
    /// Hosts a previous run left partway: never skipped, and deployed first.
    pub unfinished: &'a BTreeSet<String>,
    /// Per-host releases for `recover`; `None` means `release` everywhere.
    pub targets: Option<&'a BTreeMap<String, String>>,
}

impl Plan {
    /// The checks run before anything changes; the same phase heads every plan.
    pub fn preflight(inv: &Inventory, balancer: &dyn Balancer) -> Phase {
        let mut steps: Vec<Step> = inv
            .hosts
            .iter()
            .map(|h| Step {
                target: h.name.clone(),
                role: Role::App,
                action: Action::Run {
                    command: remote::preflight(&inv.app),
                },
            })
            .collect();
        steps.extend(inv.balancer.hosts.iter().map(|lb| Step {
            target: lb.clone(),
            role: Role::Balancer,
            action: Action::Run {
                command: balancer.test_command(),
            },
        }));
        Phase {
            name: PhaseName::Preflight,
            steps,
        }
    }

    pub fn build(input: PlanInput<'_>) -> Result<Plan> {
        let PlanInput {
            inventory: inv,
            balancer,
            release,
            artifact,
            batch,
            observed,
            unfinished,
            targets,
        } = input;
        validate_release(&release)?;
        let total = inv.hosts.len();
        let per_batch = batch.hosts_per_batch(total);
        if per_batch >= total {
            return Err(Error::Usage {
                flag: "--batch".into(),
                message: format!(
                    "a batch of {per_batch} takes all {total} host(s) out of the pool at once, which drops traffic; use a smaller batch"
                ),
            });
        }
        let min_healthy = inv.balancer.min_healthy.hosts(total);
        if total - per_batch < min_healthy {
            return Err(Error::Usage {
                flag: "--batch".into(),
                message: format!(
                    "a batch of {per_batch} leaves {} host(s) in the pool, below balancer.min_healthy ({min_healthy})",
                    total - per_batch
                ),
            });
        }
        let app = &inv.app;
        let target_of = |h: &Host| -> String {
            targets
                .and_then(|t| t.get(&h.name).cloned())
                .unwrap_or_else(|| release.clone())
        };
        let seen = |h: &Host| observed.and_then(|o| o.get(&h.name));

        // Who needs work, in the order it gets it: hosts a previous run left partway, then
        // hosts that are unhealthy now (fixing them first restores capacity), then the rest.
        let mut skipped = Vec::new();
        let mut todo: Vec<&Host> = Vec::new();
        for h in &inv.hosts {
            match seen(h) {
                Some(o)
                    if o.healthy
                        && o.release.as_deref() == Some(target_of(h).as_str())
                        && !unfinished.contains(&h.name) =>
                {
                    skipped.push(Skipped {
                        host: h.name.clone(),
                        reason: format!("already runs {} and is healthy", target_of(h)),
                    })
                }
                _ => todo.push(h),
            }
        }
        let rank = |h: &Host| {
            if unfinished.contains(&h.name) {
                0
            } else if seen(h).is_some_and(|o| !o.healthy) {
                1
            } else {
                2
            }
        };
        todo.sort_by_key(|h| rank(h));
        let unhealthy: BTreeSet<String> = todo
            .iter()
            .filter(|h| seen(h).is_some_and(|o| !o.healthy))
            .map(|h| h.name.clone())
            .collect();

        let lb_step = |address: &String, action: Action| Step {
            target: address.clone(),
            role: Role::Balancer,
            action,
        };
        let set_pool = |down: &[String]| -> Vec<Step> {
            let content = balancer.render(&Pool::with_down(down));
            inv.balancer
                .hosts
                .iter()
                .map(|lb| {
                    lb_step(
                        lb,
                        Action::SetPool {
                            down: down.to_vec(),
                            content: content.clone(),
                            command: balancer.apply_command(),
                        },
                    )
                })
                .collect()
        };
        let per_host = |hosts: &[&Host], action: &dyn Fn(&Host) -> Action| -> Vec<Step> {
            hosts
                .iter()
                .map(|h| Step {
                    target: h.name.clone(),
                    role: Role::App,
                    action: action(h),
                })
                .collect()
        };
        let health = |h: &Host| Action::HealthCheck {
            address: h.address.clone(),
            port: app.port,
            path: inv.health.path.clone(),
            expect_status: inv.health.expect_status,
            interval: inv.health.interval,
            timeout: inv.health.timeout,
            successes: inv.health.successes,
        };
        let restart = |_: &Host| Action::Run {
            command: app.restart.clone(),
        };
        let switch_back = |_: &Host| Action::Run {
            command: remote::switch_back(app),
        };
        let phase = |name, steps| Phase { name, steps };

        let stage = match &artifact {
            Some(a) => per_host(&todo, &|h| Action::Upload {
                check: remote::artifact_present(app, &target_of(h), &a.sha256),
                upload: remote::upload(app, &target_of(h), &a.sha256),
            }),
            None => Vec::new(),
        };

        let batches = todo
            .chunks(per_batch)
            .enumerate()
            .map(|(i, hosts)| {
                let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
                let later: BTreeSet<&String> = todo
                    .iter()
                    .skip((i + 1) * per_batch)
                    .map(|h| &h.name)
                    .collect();
                let held_out: Vec<String> = unhealthy
                    .iter()
                    .filter(|h| later.contains(h))
                    .cloned()
                    .collect();
                let out: Vec<String> = names.iter().chain(&held_out).cloned().collect();
                let staying: Vec<String> = inv
                    .hosts
                    .iter()
                    .map(|h| h.name.clone())
                    .filter(|h| !out.contains(h))
                    .collect();
                let drain = || -> Vec<Step> {
                    inv.balancer
                        .hosts
                        .iter()
                        .map(|lb| {
                            lb_step(
                                lb,
                                Action::Drain {
                                    command: balancer.in_flight_command(hosts),
                                    timeout: inv.balancer.drain_timeout,
                                },
                            )
                        })
                        .collect()
                };
                let capacity = phase(
                    PhaseName::CapacityCheck,
                    vec![Step {
                        target: FLEET.into(),
                        role: Role::Fleet,
                        action: Action::CapacityCheck {
                            staying,
                            min_healthy,
                            path: inv.health.path.clone(),
                            port: app.port,
                            expect_status: inv.health.expect_status,
                        },
                    }],
                );
                Batch {
                    number: i + 1,
                    hosts: names.clone(),
                    held_out: held_out.clone(),
                    phases: vec![
                        capacity.clone(),
                        phase(PhaseName::RemoveFromPool, set_pool(&out)),
                        phase(PhaseName::Drain, drain()),
                        phase(
                            PhaseName::Switch,
                            per_host(hosts, &|h| Action::Run {
                                command: remote::switch(app, &target_of(h)),
                            }),
                        ),
                        phase(PhaseName::Restart, per_host(hosts, &restart)),
                        phase(PhaseName::HealthCheck, per_host(hosts, &health)),
                        phase(PhaseName::ReturnToPool, set_pool(&held_out)),
                    ],
                    rollback: vec![
                        phase(PhaseName::SwitchBack, per_host(hosts, &switch_back)),
                        phase(PhaseName::Restart, per_host(hosts, &restart)),
                        phase(PhaseName::HealthCheck, per_host(hosts, &health)),
                        phase(PhaseName::ReturnToPool, set_pool(&held_out)),
                    ],
                    undo: vec![
                        capacity,
                        phase(PhaseName::RemoveFromPool, set_pool(&names)),
                        phase(PhaseName::Drain, drain()),
                        phase(PhaseName::SwitchBack, per_host(hosts, &switch_back)),
                        phase(PhaseName::Restart, per_host(hosts, &restart)),
                        phase(PhaseName::HealthCheck, per_host(hosts, &health)),
                        phase(PhaseName::ReturnToPool, set_pool(&[])),
                    ],
                }
            })
            .collect();

        let all: Vec<&Host> = inv.hosts.iter().collect();
        let targets = todo
            .iter()
            .map(|h| (h.name.clone(), target_of(h)))
            .collect();
        Ok(Plan {
            app: app.name.clone(),
            release,
            strategy: "rolling",
            hosts: inv.hosts.clone(),
            balancers: inv.balancer.hosts.clone(),
            upstream_file: inv.balancer.upstream_file.clone(),
            reload: inv.balancer.reload.clone(),
            preflight: Plan::preflight(inv, balancer),
            skipped,
            targets,
            stage: phase(PhaseName::Stage, stage),
            batches,
            finish: phase(
                PhaseName::Prune,
                per_host(&all, &|_| Action::Run {
                    command: remote::prune(app),
                }),
            ),
            artifact,
        })
    }

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
            None => "not given: staging is left out of this plan".into(),
        };
        out.push_str(&format!(
            "Plan: {} release {} ({} strategy), {} host(s) in {} batch(es), {} load balancer(s)\nArtifact: {artifact}\n",
            self.app,
            self.release,
            self.strategy,
            self.hosts.len(),
            self.batches.len(),
            self.balancers.len(),
        ));
        render_phase(
            &mut out,
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
            for (i, phase) in batch.phases.iter().enumerate() {
                render_steps(&mut out, &format!("{}. {}", i + 1, phase.name), phase);
            }
            out.push_str("  On failure, roll this batch back:\n");
            for (i, phase) in batch.rollback.iter().enumerate() {
                render_steps(&mut out, &format!("R{}. {}", i + 1, phase.name), phase);
            }
            out.push_str(
                "  With --on-failure rollback-all, after a later batch fails, undo this batch:\n",
            );
            for (i, phase) in batch.undo.iter().enumerate() {
                render_steps(&mut out, &format!("U{}. {}", i + 1, phase.name), phase);
            }
        }
        render_phase(&mut out, "Finish", &self.finish);
        out
    }
}

fn render_phase(out: &mut String, title: &str, phase: &Phase) {
    out.push_str(&format!("\n{title}\n"));
    render_steps(out, phase.name.as_str(), phase);
}

fn render_steps(out: &mut String, label: &str, phase: &Phase) {
    if phase.steps.is_empty() {
        out.push_str(&format!("  {label}: nothing to do\n"));
    }
    for step in &phase.steps {
        let who = match step.role {
            Role::App | Role::Fleet => step.target.clone(),
            Role::Balancer => format!("lb {}", step.target),
        };
        match &step.action {
            Action::Run { command } => {
                out.push_str(&format!("  {label} {who}\n      $ {command}\n"));
            }
            Action::Upload { check, upload } => out.push_str(&format!(
                "  {label} {who}\n      $ {check}\n      unless present, the jar on stdin to:\n      $ {upload}\n"
            )),
            Action::SetPool {
                down,
                content,
                command,
            } => {
                let down = if down.is_empty() {
                    "every host in the pool".to_string()
                } else {
                    format!("down: {}", down.join(", "))
                };
                out.push_str(&format!("  {label} {who} ({down}), upstream file:\n"));
                for line in content.lines() {
                    out.push_str(&format!("      | {line}\n"));
                }
                out.push_str(&format!("      $ {command}\n"));
            }
            Action::Drain { command, timeout } => out.push_str(&format!(
                "  {label} {who}: until it prints 0, at most {}\n      $ {command}\n",
                humantime::format_duration(*timeout)
            )),
            Action::HealthCheck {
                address,
                port,
                path,
                expect_status,
                interval,
                timeout,
                successes,
            } => out.push_str(&format!(
                "  {label} {who}: GET http://{address}:{port}{path} from the host, expect {expect_status} {successes} time(s) in a row, every {}, at most {}\n",
                humantime::format_duration(*interval),
                humantime::format_duration(*timeout)
            )),
            Action::CapacityCheck {
                staying,
                min_healthy,
                path,
                port,
                expect_status,
            } => out.push_str(&format!(
                "  {label}: at least {min_healthy} of {} healthy (GET :{port}{path} = {expect_status}) while the batch is out\n",
                if staying.is_empty() { "(none)".to_string() } else { staying.join(", ") }
            )),
        }
    }
}
