//! Pre-flight: what every host and load balancer looks like before anything changes (live
//! release, health, pool membership, the live blue-green slot), refused whole if any check
//! fails or anything read back breaks the rules.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures::future::join_all;
use tokio::time::Instant;

use super::step::run;
use super::{COMMAND_DEADLINE, PROBE_DEADLINE, Sessions};
use crate::balancer::Balancer;
use crate::error::{Error, HostFailure, Result};
use crate::health::{HealthCheck, HealthSpec};
use crate::inventory::{Inventory, Slot, Strategy};
use crate::plan::{Action, HostAtPreflight, PhaseName, Plan, Role, is_release};
use crate::report::{Event, Reporter, StepState};

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
    let (observation, failures) =
        survey(inv, balancer, health, sessions, artifact_bytes, reporter).await;
    if failures.is_empty() {
        Ok(observation)
    } else {
        Err(Error::Preflight { failures })
    }
}

/// Pre-flight's checks, all of them, with what they found and every failure, sorted by host:
/// `roller check` shows both, a rollout refuses to start on any failure.
pub async fn survey(
    inv: &Inventory,
    balancer: &dyn Balancer,
    health: &dyn HealthCheck,
    sessions: &Sessions,
    artifact_bytes: Option<u64>,
    reporter: &dyn Reporter,
) -> (FleetAtPreflight, Vec<HostFailure>) {
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
        let Action::Check { command } = &step.action else {
            unreachable!("pre-flight steps are commands")
        };
        let result = run(session.as_ref(), command, None, COMMAND_DEADLINE)
            .await
            .map_err(|e| e.to_string());
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
    }))
    .await;
    for ((name, facts), probe) in facts_of.into_iter().zip(probes) {
        // An unhealthy app is the rollout's business (a release may fix it); a host whose
        // health cannot be checked at all would fail every health check the rollout makes.
        let healthy = match probe {
            Ok(()) => true,
            Err(e @ crate::health::ProbeError::CannotCheck(_)) => {
                failures.push(HostFailure {
                    host: name.clone(),
                    step: "preflight".into(),
                    message: format!("cannot check health: {e}"),
                });
                false
            }
            Err(_) => false,
        };
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
    failures.sort_by(|a, b| a.host.cmp(&b.host));
    (observation, failures)
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
