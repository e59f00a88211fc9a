//! `roller check`: everything a rollout's pre-flight checks, and whether the deploy lock or an
//! unfinished rollout would keep one out, without changing anything. It runs pre-flight's own
//! checks ([`executor::survey`]), so what passes here passes there.

use serde::Serialize;
use std::path::PathBuf;

use super::{Hints, lock_view, read_state};
use crate::balancer::Nginx;
use crate::error::{HostFailure, Result};
use crate::executor;
use crate::health::HttpOverSsh;
use crate::inventory::{Inventory, Strategy};
use crate::plan::Artifact;
use crate::report::{Event, Reporter};
use crate::selection::Selection;
use crate::session;

/// What `roller check` is asked.
pub struct CheckRequest {
    pub inventory: Inventory,
    pub inventory_path: PathBuf,
    pub selection: Selection,
    /// The jar a rollout would upload, for the free-disk check; without it, only pre-flight's
    /// margin must be free.
    pub artifact: Option<PathBuf>,
}

/// Every problem found, each naming its host, and what was found on the hosts that answered.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// True when a rollout could start now: no problem at all.
    pub ready: bool,
    pub targets: Vec<Checked>,
    pub problems: Vec<HostFailure>,
}

/// One app host or load balancer.
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    pub name: String,
    /// `app` or `balancer`.
    pub role: &'static str,
    /// Connected and authenticated, its host key matching `known_hosts`.
    pub reached: bool,
    /// No problem names it.
    pub ok: bool,
    /// App hosts that passed pre-flight: the release they serve.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// App hosts that passed pre-flight: whether the health check answered. An unhealthy host
    /// does not keep a rollout from starting (it goes first), so it is no problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_pool: Option<bool>,
}

impl CheckReport {
    /// For people: a line per host and load balancer, then every problem, then the verdict.
    pub fn render_text(&self) -> String {
        let width = self.targets.iter().map(|t| t.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for t in &self.targets {
            let verdict = if t.ok { "ok" } else { "PROBLEM" };
            let what = match (t.role, &t.healthy) {
                ("balancer", _) => "load balancer".to_string(),
                (_, None) if !t.reached => "not reached".to_string(),
                (_, None) => "not checked further".to_string(),
                (_, Some(healthy)) => format!(
                    "{}, {}, {}",
                    t.release.as_deref().unwrap_or("no release"),
                    if *healthy { "healthy" } else { "unhealthy" },
                    if t.in_pool == Some(true) {
                        "in the pool"
                    } else {
                        "out of the pool"
                    }
                ),
            };
            out.push_str(&format!("{:width$}  {verdict:7}  {what}\n", t.name));
        }
        if self.ready {
            out.push_str("a rollout could start\n");
        } else {
            out.push_str(&format!(
                "{} problem(s); a rollout could not start:\n",
                self.problems.len()
            ));
            for p in &self.problems {
                out.push_str(&format!("  - {p}\n"));
            }
        }
        out
    }
}

/// Pre-flight's step events are not shown: the report lists what they found.
struct Quiet;

impl Reporter for Quiet {
    fn event(&self, _: &Event) {}
}

pub async fn check(request: CheckRequest) -> Result<CheckReport> {
    let mut inv = request.inventory;
    let selected = request.selection.resolve(&inv)?;
    let artifact = request
        .artifact
        .as_deref()
        .map(Artifact::load)
        .transpose()?;
    let hints = Hints::for_inventory(&request.inventory_path);
    let balancer = Nginx::new(&inv.balancer, &inv.app, &inv.hosts);
    if let Some(selected) = &selected {
        inv.hosts.retain(|h| selected.contains(&h.name));
    }

    let (mut sessions, mut problems) = session::connect_each(&inv).await?;

    let reached: std::collections::BTreeSet<String> = sessions.keys().cloned().collect();
    // With `sudo = true`, sudo is asked first, as a rollout asks it; pre-flight then runs
    // through it on the hosts where it answered, and a host where it refused is a problem.
    match executor::sudo_refusals(&inv, &sessions).await {
        Ok(refusals) => {
            for refused in refusals {
                if let Some(session) = sessions.remove(&refused.host) {
                    session.close().await;
                }
                problems.push(HostFailure {
                    host: refused.host.clone(),
                    step: "sudo".into(),
                    message: refused.reason(),
                });
            }
        }
        Err(crate::error::Error::Preflight { failures }) => problems.extend(failures),
        Err(e) => return Err(e),
    }
    // A host whose probe failed outright is already a problem; it is not checked further.
    for p in problems.iter().filter(|p| p.step == "sudo") {
        if let Some(session) = sessions.remove(&p.host) {
            session.close().await;
        }
    }
    let sessions = executor::as_root(&inv, sessions);

    // Pre-flight on whatever answered: one unreachable host must not hide another's problem.
    let mut reachable = inv.clone();
    reachable.hosts.retain(|h| sessions.contains_key(&h.name));
    reachable
        .balancer
        .hosts
        .retain(|lb| sessions.contains_key(lb));
    if reachable.balancer.hosts.len() < inv.balancer.hosts.len() {
        // The live slot is read from every load balancer; with one silent it cannot be, and
        // that load balancer is already a problem.
        reachable.strategy = Strategy::Rolling;
    }
    let (seen, failures) = executor::survey(
        &reachable,
        &balancer,
        &HttpOverSsh,
        &sessions,
        Some(artifact.as_ref().map_or(0, |a| a.bytes)),
        &Quiet,
    )
    .await;
    problems.extend(failures);

    if let Some(lb) = sessions.get(&inv.balancer.lock_host) {
        problems.extend(lock_problems(lb.as_ref(), &inv, &hints).await);
    }
    for session in sessions.values() {
        session.close().await;
    }

    problems.sort_by(|a, b| a.host.cmp(&b.host));
    let named = |name: &str| problems.iter().any(|p| p.host == name);
    let mut targets: Vec<Checked> = inv
        .hosts
        .iter()
        .map(|h| {
            let found = seen.hosts.get(&h.name);
            Checked {
                name: h.name.clone(),
                role: "app",
                reached: reached.contains(&h.name),
                ok: !named(&h.name),
                release: found.and_then(|f| f.release.clone()),
                healthy: found.map(|f| f.healthy),
                in_pool: found.map(|f| f.in_pool),
            }
        })
        .collect();
    targets.extend(inv.balancer.hosts.iter().map(|lb| Checked {
        name: lb.clone(),
        role: "balancer",
        reached: reached.contains(lb),
        ok: !named(lb),
        release: None,
        healthy: None,
        in_pool: None,
    }));
    Ok(CheckReport {
        ready: problems.is_empty(),
        targets,
        problems,
    })
}

/// What on the lock host would keep a rollout from starting: a live deploy lock, a rollout
/// that left hosts to finish, a state file that cannot be trusted.
async fn lock_problems(
    lb: &dyn crate::transport::Transport,
    inv: &Inventory,
    hints: &Hints,
) -> Vec<HostFailure> {
    let problem = |step: &str, message: String| HostFailure {
        host: inv.balancer.lock_host.clone(),
        step: step.into(),
        message,
    };
    let mut problems = Vec::new();
    match lock_view::holder(lb, inv).await {
        Ok(Some(held)) if held.live => problems.push(problem(
            "deploy lock",
            format!(
                "held by {}: a rollout now would wait for it (--lock-wait) or exit 7",
                held.holder
            ),
        )),
        Ok(_) => {}
        Err(e) => problems.push(problem("deploy lock", e.to_string())),
    }
    match read_state(lb, inv).await {
        Ok(Some(state)) if state.status.stranded() => {
            if let Some(unfinished) = lock_view::unfinished(&state, hints) {
                problems.push(problem("unfinished rollout", unfinished.to_string()));
            }
        }
        Ok(_) => {}
        Err(e) => problems.push(problem("rollout state", e.to_string())),
    }
    problems
}
