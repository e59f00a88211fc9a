//! `roller status`: what the fleet runs now, for people and release jobs. Read-only: it takes no
//! lock and writes nothing, so it can run beside a rollout, which is when it is most wanted.
//!
//! Everything shown comes from the hosts and is checked before it is shown: release names by
//! the release rules (anything else is flagged, not printed as a release), the pool from the
//! upstream file's `server` lines of the inventory's hosts, the rollout state as `resume`
//! checks it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use futures::future::join_all;
use serde::Serialize;

use super::lock_view::{self, LockHolder};
use super::{Hints, read_state};
use crate::balancer::{Balancer, Nginx};
use crate::error::{Error, HostFailure, Result};
use crate::executor::{self, Sessions, release_name};
use crate::health::{HealthCheck, HealthSpec, HttpOverSsh};
use crate::inventory::{Inventory, Slot};
use crate::journal::{Progress, Status};
use crate::plan::is_release;
use crate::selection::Selection;
use crate::session;

/// One look at health, as pre-flight takes it.
const PROBE_DEADLINE: Duration = Duration::from_secs(3);
const READ_DEADLINE: Duration = Duration::from_secs(30);

/// What `roller status` is asked.
pub struct StatusRequest {
    pub inventory: Inventory,
    pub inventory_path: PathBuf,
    pub selection: Selection,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetStatus {
    pub app: String,
    /// Blue-green: the slot every load balancer sends traffic to, when they agree on one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_slot: Option<Slot>,
    pub hosts: Vec<HostStatus>,
    pub balancers: Vec<BalancerStatus>,
    /// The deploy lock's holder; `null` when nobody holds it.
    pub lock: Option<LockHolder>,
    /// The last rollout, when it did not finish; `null` otherwise.
    pub unfinished: Option<UnfinishedRollout>,
    /// What could not be read, each naming its host.
    pub problems: Vec<HostFailure>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    pub name: String,
    pub reached: bool,
    /// The release traffic reaches: `current`, or the live slot's link under blue-green.
    pub live: Option<String>,
    /// Blue-green: each slot's release.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<BTreeMap<&'static str, Option<String>>>,
    /// The releases in `releases/`, sorted by name.
    pub releases: Vec<String>,
    /// The health check on the port traffic goes to; `null` when the host was not reached.
    pub healthy: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BalancerStatus {
    pub name: String,
    pub reached: bool,
    /// The port its upstream sends traffic to, when every server shares one.
    pub port: Option<u16>,
    /// Each host of the inventory: `in` or `down`; empty when the upstream file was not read.
    pub pool: BTreeMap<String, &'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UnfinishedRollout {
    pub id: String,
    pub release: String,
    pub status: Status,
    /// `user@machine` of the controller that ran it.
    pub controller: String,
    pub started: u64,
    /// Hosts the rollout had started and not finished, as it last recorded them; where the
    /// pool really stands is in `balancers`.
    pub partway: Vec<String>,
    /// The command that finishes it.
    pub finish: String,
    /// The command that puts every host back on its release from before it.
    pub undo: String,
}

pub async fn status(request: StatusRequest) -> Result<FleetStatus> {
    let mut inv = request.inventory;
    let selected = request.selection.resolve(&inv)?;
    let hints = Hints::for_inventory(&request.inventory_path);
    let balancer = Nginx::new(&inv.balancer, &inv.app, &inv.hosts);
    if let Some(selected) = &selected {
        inv.hosts.retain(|h| selected.contains(&h.name));
    }
    let (mut sessions, mut problems) = session::connect_each(&inv).await?;
    // With `sudo = true` the state directory and the links may be root's alone: read through
    // sudo, asked first as a rollout asks it (which changes nothing); a host where it is
    // refused is a problem, not read.
    let refused: Vec<HostFailure> = match executor::sudo_refusals(&inv, &sessions).await {
        Ok(refusals) => refusals
            .into_iter()
            .map(|r| failure(&r.host, "sudo", r.reason()))
            .collect(),
        Err(Error::Preflight { failures }) => failures,
        Err(e) => return Err(e),
    };
    for r in &refused {
        if let Some(s) = sessions.remove(&r.host) {
            s.close().await;
        }
    }
    problems.extend(refused);
    let sessions = executor::as_root(&inv, sessions);

    let balancers = read_pools(&inv, &balancer, &sessions, &mut problems).await;
    let ports: BTreeSet<u16> = balancers.iter().filter_map(|b| b.port).collect();
    let live_port = match (ports.len(), balancers.iter().all(|b| b.port.is_some())) {
        (1, true) => ports.into_iter().next(),
        _ => None,
    };
    let live_slot = inv.blue_green.as_ref().and_then(|bg| match live_port {
        Some(p) if p == bg.blue_port => Some(Slot::Blue),
        Some(p) if p == bg.green_port => Some(Slot::Green),
        _ => None,
    });
    let hosts = read_hosts(&inv, &sessions, live_port, live_slot, &mut problems).await;

    let (lock, unfinished) = match sessions.get(&inv.balancer.lock_host) {
        Some(lb) => {
            let lock = lock_view::holder(lb.as_ref(), &inv)
                .await
                .unwrap_or_else(|e| {
                    problems.push(on_lock_host(&inv, "deploy lock", e.to_string()));
                    None
                });
            let state = read_state(lb.as_ref(), &inv).await.unwrap_or_else(|e| {
                problems.push(on_lock_host(&inv, "rollout state", e.to_string()));
                None
            });
            let unfinished = state
                .filter(|s| s.status.unfinished())
                .map(|s| UnfinishedRollout {
                    partway: s
                        .hosts
                        .iter()
                        .filter(|(_, p)| {
                            matches!(
                                p,
                                Progress::Drained
                                    | Progress::Switched
                                    | Progress::Restarted
                                    | Progress::Failed
                            )
                        })
                        .map(|(h, _)| h.clone())
                        .collect(),
                    id: s.id,
                    release: s.release,
                    status: s.status,
                    controller: s.controller,
                    started: s.started,
                    finish: hints.resume.clone(),
                    undo: hints.recover.clone(),
                });
            (lock, unfinished)
        }
        None => (None, None),
    };
    for session in sessions.values() {
        session.close().await;
    }
    problems.sort_by(|a, b| a.host.cmp(&b.host));
    Ok(FleetStatus {
        app: inv.app.name.clone(),
        live_slot,
        hosts,
        balancers,
        lock,
        unfinished,
        problems,
    })
}

fn on_lock_host(inv: &Inventory, step: &str, message: String) -> HostFailure {
    HostFailure {
        host: inv.balancer.lock_host.clone(),
        step: step.into(),
        message,
    }
}

/// Each load balancer's pool, from its upstream file.
async fn read_pools(
    inv: &Inventory,
    balancer: &Nginx,
    sessions: &Sessions,
    problems: &mut Vec<HostFailure>,
) -> Vec<BalancerStatus> {
    let command = balancer.show_command();
    let reads = join_all(inv.balancer.hosts.iter().map(|lb| {
        let command = command.clone();
        async move {
            match sessions.get(lb) {
                Some(s) => Some(s.exec(&command, None, READ_DEADLINE).await),
                None => None,
            }
        }
    }))
    .await;
    let mut out = Vec::new();
    for (lb, read) in inv.balancer.hosts.iter().zip(reads) {
        let text = match read {
            None => None,
            Some(Ok(o)) if o.success() => Some(o.stdout_text()),
            Some(Ok(o)) => {
                problems.push(failure(lb, "upstream file", o.stderr_text()));
                None
            }
            Some(Err(e)) => {
                problems.push(failure(lb, "upstream file", e.to_string()));
                None
            }
        };
        let (port, pool) = match &text {
            Some(text) => {
                let down = balancer.parse_down(text);
                let pool = balancer
                    .hosts
                    .iter()
                    .map(|h| {
                        let state = if down.contains(&h.name) { "down" } else { "in" };
                        (h.name.clone(), state)
                    })
                    .collect();
                (balancer.parse_port(text), pool)
            }
            None => (None, BTreeMap::new()),
        };
        out.push(BalancerStatus {
            name: lb.clone(),
            reached: sessions.contains_key(lb),
            port,
            pool,
        });
    }
    out
}

/// Each app host's links, releases on disk and health.
async fn read_hosts(
    inv: &Inventory,
    sessions: &Sessions,
    live_port: Option<u16>,
    live_slot: Option<Slot>,
    problems: &mut Vec<HostFailure>,
) -> Vec<HostStatus> {
    let command = crate::remote::inspect(&inv.app);
    let reads = join_all(inv.hosts.iter().map(|h| {
        let command = command.clone();
        async move {
            let session = sessions.get(&h.name)?;
            let read = session.exec(&command, None, READ_DEADLINE).await;
            let mut spec = HealthSpec::probe(&h.address, inv);
            spec.port = live_port.unwrap_or(inv.app.port);
            let healthy = HttpOverSsh
                .probe(session.as_ref(), &spec, PROBE_DEADLINE)
                .await
                .is_ok();
            Some((read, healthy))
        }
    }))
    .await;
    let mut out = Vec::new();
    for (host, read) in inv.hosts.iter().zip(reads) {
        let mut status = HostStatus {
            name: host.name.clone(),
            reached: read.is_some(),
            live: None,
            slots: None,
            releases: Vec::new(),
            healthy: read.as_ref().map(|(_, healthy)| *healthy),
        };
        let text = match read {
            None => None,
            Some((Ok(o), _)) if o.success() => Some(o.stdout_text()),
            Some((Ok(o), _)) => {
                problems.push(failure(&host.name, "app dir", o.stderr_text()));
                None
            }
            Some((Err(e), _)) => {
                problems.push(failure(&host.name, "app dir", e.to_string()));
                None
            }
        };
        if let Some(text) = text {
            let mut links: BTreeMap<&str, Option<String>> = BTreeMap::new();
            let mut strange = Vec::new();
            for line in text.lines() {
                let Some((key, value)) = line.split_once('=') else {
                    strange.push(line.to_string());
                    continue;
                };
                match key {
                    "current" | "blue" | "green" if value.is_empty() => {
                        links.insert(key_name(key), None);
                    }
                    "current" | "blue" | "green" => {
                        let release = release_name(value);
                        if is_release(&release) {
                            links.insert(key_name(key), Some(release));
                        } else {
                            links.insert(key_name(key), None);
                            strange.push(line.to_string());
                        }
                    }
                    "release" if is_release(value) => status.releases.push(value.to_string()),
                    _ => strange.push(line.to_string()),
                }
            }
            status.releases.sort();
            if !strange.is_empty() {
                problems.push(failure(
                    &host.name,
                    "app dir",
                    format!(
                        "not a release by the release rules, not shown: {}",
                        strange
                            .iter()
                            .map(|s| format!("{:?}", s.chars().take(120).collect::<String>()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            let link = |k: &str| links.get(k).cloned().flatten();
            if inv.blue_green.is_some() {
                status.live = live_slot.and_then(|s| link(s.as_str()));
                status.slots = Some(BTreeMap::from([
                    ("blue", link("blue")),
                    ("green", link("green")),
                ]));
                if live_slot.is_none() && inv.app.port == live_port.unwrap_or(0) {
                    // Not adopted yet: one process per host on app.port.
                    status.live = link("current");
                }
            } else {
                status.live = link("current");
            }
        }
        out.push(status);
    }
    out
}

fn key_name(key: &str) -> &'static str {
    match key {
        "blue" => "blue",
        "green" => "green",
        _ => "current",
    }
}

fn failure(host: &str, step: &str, message: String) -> HostFailure {
    HostFailure {
        host: host.to_string(),
        step: step.into(),
        message,
    }
}

impl FleetStatus {
    /// For people: a line per host, a line per load balancer, the lock and an unfinished
    /// rollout with the commands that deal with it, and what could not be read.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let width = self.hosts.iter().map(|h| h.name.len()).max().unwrap_or(0);
        match self.live_slot {
            Some(slot) => out.push_str(&format!(
                "{}: traffic on the {} slot\n",
                self.app,
                slot.as_str()
            )),
            None => out.push_str(&format!("{}\n", self.app)),
        }
        for h in &self.hosts {
            if !h.reached {
                out.push_str(&format!("  {:width$}  not reached\n", h.name));
                continue;
            }
            let live = h.live.as_deref().unwrap_or("no live release");
            let slots = h
                .slots
                .as_ref()
                .map(|s| {
                    format!(
                        " (blue {}, green {})",
                        s["blue"].as_deref().unwrap_or("-"),
                        s["green"].as_deref().unwrap_or("-")
                    )
                })
                .unwrap_or_default();
            let health = match h.healthy {
                Some(true) => "healthy",
                Some(false) => "UNHEALTHY",
                None => "health unknown",
            };
            let down: Vec<&str> = self
                .balancers
                .iter()
                .filter(|b| b.pool.get(&h.name) == Some(&"down"))
                .map(|b| b.name.as_str())
                .collect();
            let pool = if down.is_empty() {
                "in the pool".to_string()
            } else {
                format!("OUT OF THE POOL on {}", down.join(", "))
            };
            out.push_str(&format!(
                "  {:width$}  {live}{slots}, {health}, {pool}; on disk: {}\n",
                h.name,
                if h.releases.is_empty() {
                    "-".to_string()
                } else {
                    h.releases.join(" ")
                }
            ));
        }
        for b in &self.balancers {
            let port = b.port.map(|p| format!(" port {p}")).unwrap_or_default();
            let down: Vec<&str> = b
                .pool
                .iter()
                .filter(|(_, s)| **s == "down")
                .map(|(h, _)| h.as_str())
                .collect();
            let state = match (b.reached, b.pool.is_empty(), down.is_empty()) {
                (false, _, _) => "not reached".to_string(),
                (true, true, _) => "upstream file not read".to_string(),
                (true, false, true) => "every host in the pool".to_string(),
                (true, false, false) => format!("down: {}", down.join(", ")),
            };
            out.push_str(&format!("load balancer {}{port}: {state}\n", b.name));
        }
        match &self.lock {
            Some(l) if l.live => out.push_str(&format!("deploy lock: held by {}\n", l.holder)),
            Some(l) => out.push_str(&format!(
                "deploy lock: left by {}, lease expired (the next rollout takes it over)\n",
                l.holder
            )),
            None => out.push_str("deploy lock: free\n"),
        }
        if let Some(u) = &self.unfinished {
            out.push_str(&format!(
                "unfinished rollout {} of {} ({:?}) by {}",
                u.id, u.release, u.status, u.controller
            ));
            if !u.partway.is_empty() {
                out.push_str(&format!("; partway: {}", u.partway.join(", ")));
            }
            out.push_str(&format!(
                "\n  finish it: {}\n  or undo it: {}\n",
                u.finish, u.undo
            ));
        }
        if !self.problems.is_empty() {
            out.push_str("could not read:\n");
            for p in &self.problems {
                out.push_str(&format!("  - {p}\n"));
            }
        }
        out
    }
}
