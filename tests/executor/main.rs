//! The executor's decisions (order, rollback, reporting) over an in-memory fleet: what a real
//! server would add here is only latency. This file holds the fake fleet and the helpers; the
//! tests are grouped by what they decide: `rolling` (a rollout and its failures), `resuming`
//! (skipping, capacity, handovers, interrupts, recover and resume), `strategies` (blue-green
//! and canary).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use roller::balancer::{Balancer, Nginx};
use roller::error::Error;
use roller::executor::{
    self, Executor, ExecutorInput, FailurePolicy, JournalAndLockHost, KeptState, Options,
};
use roller::health::HttpOverSsh;
use roller::inventory::{Inventory, Slot};
use roller::journal::{self, Progress, RolloutState, Status};
use roller::plan::{Artifact, BatchSize, Plan, PlanInput};
use roller::remote;
use roller::report::{Event, HostOutcome, Outcome, Reporter, RolloutReport, StepState};
use roller::transport::TransportError;
use roller::transport::memory::{Call, MemoryFleet, fail, ok};

const INVENTORY: &str = r#"
[ssh]
user = "deploy"
known_hosts = "/dev/null"
[app]
name = "shop"
dir = "/opt/shop"
restart = "restart-app"
port = 8080
[health]
interval = "1ms"
timeout = "20ms"
[balancer]
hosts = ["lb-1"]
upstream_file = "/etc/nginx/conf.d/shop.conf"
drain_timeout = "2s"
[[hosts]]
name = "web-1"
address = "10.0.1.1"
[[hosts]]
name = "web-2"
address = "10.0.1.2"
[[hosts]]
name = "web-3"
address = "10.0.1.3"
"#;

/// What the fake hosts know: the live release per host, the release each running process
/// serves, which releases answer their health check, the LB's upstream file.
#[derive(Default)]
struct World {
    current: HashMap<String, String>,
    running: HashMap<String, String>,
    healthy: Vec<String>,
    upstream: String,
    in_flight: Vec<u64>,
    /// Whether the LB reports its workers from before the last reload (none are left).
    reports_retiring: bool,
    lb_test_fails: bool,
    /// Hosts whose process dies whenever it is restarted.
    broken: Vec<String>,
    /// Hosts on which v2 answers 503.
    sick_on_v2: Vec<String>,
    /// Probes still to answer 503 after a restart, per host: a JVM warming up.
    warming: HashMap<String, u32>,
    /// Every rollout state saved on the load balancer, in order.
    saved_states: Vec<RolloutState>,
    /// Every upstream file the LB was given, in order.
    upstream_history: Vec<String>,
    /// Blue-green: each `host/slot` link's release, and the release each running slot serves.
    slots: HashMap<String, String>,
    slots_running: HashMap<String, String>,
    /// Hosts that scheduled the old slot's stop.
    keeping_old: Vec<String>,
    /// Canary: the access log lines written during each hold, handed out one hold at a time.
    holds: Vec<String>,
}

/// A command the fake hosts understand, recognized by being exactly what roller's own builders
/// make for this inventory: a command roller did not mean to send matches nothing.
#[derive(Debug, PartialEq)]
enum Op {
    SaveState,
    Preflight,
    TestBalancer,
    SetPool,
    InFlight,
    ArtifactPresent,
    Upload,
    Switch(String),
    SwitchBack,
    Restart,
    Prune,
    SwitchSlot(Slot, String),
    StartSlot(Slot),
    StopSlot(Slot),
    KeepOld,
    PruneSlots,
    LogSize,
    LogSince,
}

const RELEASES: [&str; 3] = ["v0", "v1", "v2"];

fn classify(inventory: &str, cmd: &str) -> Option<Op> {
    let inv = Inventory::parse(inventory).unwrap();
    let balancer = Nginx::new(&inv.balancer, &inv.app, &inv.hosts);
    let app = &inv.app;
    let sha = artifact_sha256();
    let hosts: Vec<&roller::inventory::Host> = inv.hosts.iter().collect();
    // Every run of hosts a batch can drain, in plan order.
    let batches = (0..hosts.len()).flat_map(|i| (i + 1..=hosts.len()).map(move |j| (i, j)));
    let op = if cmd == journal::write_state_command(&inv.balancer.state_dir, &app.name) {
        Op::SaveState
    } else if cmd == remote::preflight(app) {
        Op::Preflight
    } else if cmd == balancer.test_command() {
        Op::TestBalancer
    } else if cmd == balancer.apply_command() {
        Op::SetPool
    } else if batches
        .into_iter()
        .any(|(i, j)| cmd == balancer.in_flight_command(&hosts[i..j]))
    {
        Op::InFlight
    } else if RELEASES
        .iter()
        .any(|r| cmd == remote::artifact_present(app, r, sha))
    {
        Op::ArtifactPresent
    } else if RELEASES.iter().any(|r| cmd == remote::upload(app, r, sha)) {
        Op::Upload
    } else if let Some(r) = RELEASES.iter().find(|r| cmd == remote::switch(app, r)) {
        Op::Switch(r.to_string())
    } else if cmd == remote::switch_back(app) {
        Op::SwitchBack
    } else if cmd == app.restart {
        Op::Restart
    } else if cmd == remote::prune(app) {
        Op::Prune
    } else if let Some(op) = inv.blue_green.as_ref().and_then(|bg| {
        let slots = [Slot::Blue, Slot::Green];
        let switched = slots.iter().find_map(|s| {
            let link = format!("current-{}", s.as_str());
            RELEASES
                .iter()
                .find(|r| cmd == remote::switch_link(app, &link, r))
                .map(|r| Op::SwitchSlot(*s, r.to_string()))
        });
        switched
            .or_else(|| {
                slots
                    .into_iter()
                    .find(|s| cmd == bg.command(&bg.restart, *s))
                    .map(Op::StartSlot)
            })
            .or_else(|| {
                slots
                    .into_iter()
                    .find(|s| cmd == bg.command(&bg.stop, *s))
                    .map(Op::StopSlot)
            })
            .or_else(|| {
                slots
                    .into_iter()
                    .any(|live| {
                        let stop = bg.command(&bg.stop, live.other());
                        cmd == remote::keep_old(app, live.as_str(), &stop, bg.keep_old)
                    })
                    .then_some(Op::KeepOld)
            })
            .or_else(|| (cmd == remote::prune_slots(app)).then_some(Op::PruneSlots))
    }) {
        op
    } else if let Some(c) = &inv.canary {
        if cmd == remote::log_size(&c.access_log) {
            Op::LogSize
        } else if cmd == remote::log_since(&c.access_log) {
            Op::LogSince
        } else {
            return None;
        }
    } else {
        return None;
    };
    Some(op)
}

fn fleet(world: Arc<Mutex<World>>) -> MemoryFleet {
    fleet_of(INVENTORY, world)
}

fn fleet_of(inventory: &'static str, world: Arc<Mutex<World>>) -> MemoryFleet {
    let w = world.clone();
    let exec = move |target: &str, cmd: &str, stdin: Option<&bytes::Bytes>| {
        let mut w = w.lock().unwrap();
        let op = classify(inventory, cmd)
            .unwrap_or_else(|| panic!("unexpected command on {target}: {cmd}"));
        match op {
            Op::SaveState => {
                let state = serde_json::from_slice(stdin.unwrap()).unwrap();
                w.saved_states.push(state);
                ok("")
            }
            Op::Preflight => {
                let cur = w.current.get(target).cloned().unwrap_or_default();
                let mut facts = format!("free_kb=9999999\ncurrent=releases/{cur}\n");
                for slot in ["blue", "green"] {
                    if let Some(r) = w.slots.get(&format!("{target}/{slot}")) {
                        facts.push_str(&format!("{slot}=releases/{r}\n"));
                    }
                }
                ok(&facts)
            }
            Op::TestBalancer if w.lb_test_fails => {
                fail(1, "nginx: [emerg] unknown directive \"upstrem\"")
            }
            Op::TestBalancer => ok(&w.upstream.clone()),
            Op::Upload | Op::Prune | Op::PruneSlots => ok(""),
            Op::SwitchSlot(slot, release) => {
                w.slots
                    .insert(format!("{target}/{}", slot.as_str()), release);
                ok("")
            }
            Op::StartSlot(slot) => {
                let key = format!("{target}/{}", slot.as_str());
                let release = w.slots[&key].clone();
                w.slots_running.insert(key, release);
                ok("")
            }
            Op::StopSlot(slot) => {
                w.slots_running
                    .remove(&format!("{target}/{}", slot.as_str()));
                ok("")
            }
            Op::KeepOld => {
                w.keeping_old.push(target.to_string());
                ok("")
            }
            Op::LogSize => ok("1000\n"),
            Op::LogSince => {
                let lines = w.holds.remove(0);
                ok(&lines)
            }
            Op::SetPool => {
                let content = String::from_utf8(stdin.unwrap().to_vec()).unwrap();
                w.upstream = content.clone();
                w.upstream_history.push(content);
                ok("")
            }
            Op::InFlight => {
                let n = if w.in_flight.is_empty() {
                    0
                } else {
                    w.in_flight.remove(0)
                };
                if w.reports_retiring {
                    ok(&format!("{n}\n0\n"))
                } else {
                    ok(&format!("{n}\n"))
                }
            }
            Op::ArtifactPresent => ok("absent\n"),
            Op::Switch(release) => {
                let prev = w
                    .current
                    .insert(target.to_string(), release.clone())
                    .unwrap();
                if prev != release {
                    w.current.insert(format!("{target}.previous"), prev);
                }
                ok("")
            }
            Op::SwitchBack => {
                let prev = w.current[&format!("{target}.previous")].clone();
                w.current.insert(target.to_string(), prev.clone());
                ok(&format!("releases/{prev}\n"))
            }
            Op::Restart => {
                let live = if w.broken.iter().any(|b| b == target) {
                    "crashed".to_string()
                } else {
                    w.current[target].clone()
                };
                w.running.insert(target.to_string(), live);
                w.warming.insert(target.to_string(), 1);
                ok("")
            }
        }
    };
    let w = world.clone();
    let http = move |target: &str, _addr: &str, port: u16, _path: &str| {
        let mut w = w.lock().unwrap();
        if let Some(n) = w.warming.get_mut(target).filter(|n| **n > 0) {
            *n -= 1;
            return Ok(503);
        }
        let running = match port {
            8081 => w.slots_running.get(&format!("{target}/blue")),
            8082 => w.slots_running.get(&format!("{target}/green")),
            _ => w.running.get(target),
        };
        match running {
            Some(r) if r == "v2" && w.sick_on_v2.iter().any(|s| s == target) => Ok(503),
            Some(r) if w.healthy.contains(r) => Ok(200),
            Some(_) => Ok(503),
            None => Err(TransportError::Channel("connection refused".into())),
        }
    };
    MemoryFleet::new(exec, http)
}

fn options(on_failure: FailurePolicy, max_failed_hosts: usize) -> Options {
    Options {
        on_failure,
        max_failed_hosts,
        resume_hint: "roller resume -i roller.toml".into(),
        recover_hint: "roller recover -i roller.toml".into(),
        rollout_id: "r1".into(),
    }
}

fn world() -> Arc<Mutex<World>> {
    let mut w = World::default();
    for h in ["web-1", "web-2", "web-3"] {
        w.current.insert(h.into(), "v1".into());
        w.running.insert(h.into(), "v1".into());
    }
    w.healthy = vec!["v1".into(), "v2".into()];
    Arc::new(Mutex::new(w))
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl Reporter for Recorder {
    fn event(&self, event: &Event) {
        self.0.lock().unwrap().push(event.clone());
    }
}

fn artifact_sha256() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| artifact().sha256)
}

fn artifact() -> Artifact {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.jar");
    std::fs::write(&path, b"PK\x03\x04 not really a jar").unwrap();
    Artifact::load(&path).unwrap()
}

async fn rollout(
    fleet: &MemoryFleet,
    batch: BatchSize,
) -> (Result<RolloutReport, Error>, Arc<Recorder>) {
    rollout_with(
        fleet,
        batch,
        Options::default(),
        executor::never_interrupted(),
    )
    .await
}

async fn rollout_with(
    fleet: &MemoryFleet,
    batch: BatchSize,
    options: Options,
    interrupt: executor::Interrupt,
) -> (Result<RolloutReport, Error>, Arc<Recorder>) {
    rollout_full(INVENTORY, fleet, batch, options, interrupt).await
}

async fn rollout_on(
    inventory: &str,
    fleet: &MemoryFleet,
    batch: BatchSize,
) -> (Result<RolloutReport, Error>, Arc<Recorder>) {
    rollout_full(
        inventory,
        fleet,
        batch,
        Options::default(),
        executor::never_interrupted(),
    )
    .await
}

async fn rollout_full(
    inventory: &str,
    fleet: &MemoryFleet,
    batch: BatchSize,
    options: Options,
    interrupt: executor::Interrupt,
) -> (Result<RolloutReport, Error>, Arc<Recorder>) {
    rollout_to(
        Target {
            inventory,
            batch,
            options,
            interrupt,
            ..Target::default()
        },
        fleet,
    )
    .await
}

/// Where a rollout goes: everything the tests vary.
struct Target<'a> {
    inventory: &'a str,
    batch: BatchSize,
    options: Options,
    interrupt: executor::Interrupt,
    release: &'a str,
    /// Per-host releases, as `recover` gives them.
    targets: Option<BTreeMap<String, String>>,
    /// Hosts a previous run left partway, as `resume` and `recover` find them.
    unfinished: BTreeSet<String>,
}

impl Default for Target<'_> {
    fn default() -> Self {
        Target {
            inventory: INVENTORY,
            batch: BatchSize::Hosts(1),
            options: Options::default(),
            interrupt: executor::never_interrupted(),
            release: "v2",
            targets: None,
            unfinished: BTreeSet::new(),
        }
    }
}

/// The state a rollout starts from, as `roller rollout` records it.
fn initial_state(inventory: &Inventory, release: &str) -> RolloutState {
    RolloutState {
        strategy: inventory.strategy,
        kind: Default::default(),
        id: "0123456789abcdef0123456789abcdef".into(),
        app: inventory.app.name.clone(),
        release: release.into(),
        artifact: None,
        artifact_sha256: None,
        batch: BatchSize::Hosts(1),
        on_failure: FailurePolicy::RollbackBatch,
        max_failed_hosts: 0,
        controller: "test@here".into(),
        started: 0,
        updated: 0,
        status: Status::Running,
        before: BTreeMap::new(),
        hosts: BTreeMap::new(),
        out_of_pool: Vec::new(),
        balancers: inventory.balancer.hosts.clone(),
        live_slot: None,
        found: Vec::new(),
        selected: Vec::new(),
    }
}

async fn rollout_to(
    target: Target<'_>,
    fleet: &MemoryFleet,
) -> (Result<RolloutReport, Error>, Arc<Recorder>) {
    let inventory = Inventory::parse(target.inventory).unwrap();
    let balancer = Nginx::new(&inventory.balancer, &inventory.app, &inventory.hosts);
    let recorder = Arc::new(Recorder::default());
    let sessions = match executor::connect(&inventory, Arc::new(fleet.clone())).await {
        Ok(s) => s,
        Err(e) => return (Err(e), recorder),
    };
    let observed = match executor::preflight(
        &inventory,
        &balancer,
        &HttpOverSsh,
        &sessions,
        Some(100),
        recorder.as_ref(),
    )
    .await
    {
        Ok(o) => o,
        Err(e) => return (Err(e), recorder),
    };
    let plan = Plan::build(PlanInput {
        inventory: &inventory,
        balancer: &balancer,
        release: target.release.into(),
        artifact: Some(artifact()),
        batch: target.batch,
        observed: Some(&observed.hosts),
        unfinished: &target.unfinished,
        targets: target.targets.as_ref(),
        selected: None,
        strategy: inventory.strategy,
        live_slot: observed.live_slot(&inventory),
        pause: false,
        adopt: observed.adopting(&inventory),
    })
    .unwrap();
    // The store a rollout uses, without a journal: what it saves lands on the fake lb-1.
    let store = JournalAndLockHost {
        session: sessions["lb-1"].clone(),
        state_dir: inventory.balancer.state_dir.clone(),
        journal: None,
    };
    let exec = Executor::new(ExecutorInput {
        plan: &plan,
        balancer: &balancer,
        health: &HttpOverSsh,
        sessions: &sessions,
        reporter: recorder.clone(),
        options: target.options,
        interrupt: target.interrupt,
        state: Some(KeptState {
            store: &store,
            initial: initial_state(&inventory, target.release),
        }),
        observed: &observed,
        hooks: None,
    });
    (exec.run().await, recorder)
}

/// The rollout state last saved on the load balancer: what `resume` would read.
fn last_saved(world: &Arc<Mutex<World>>) -> RolloutState {
    world
        .lock()
        .unwrap()
        .saved_states
        .last()
        .cloned()
        .expect("the rollout state was saved")
}

/// Each host's progress in a saved state, in host order.
fn progress(state: &RolloutState) -> Vec<Progress> {
    ["web-1", "web-2", "web-3"]
        .iter()
        .map(|h| state.hosts[*h])
        .collect()
}

fn releases(world: &Arc<Mutex<World>>) -> Vec<(String, String)> {
    let w = world.lock().unwrap();
    ["web-1", "web-2", "web-3"]
        .iter()
        .map(|h| (w.current[*h].clone(), w.running[*h].clone()))
        .collect()
}

fn outcomes(report: &RolloutReport) -> Vec<(HostOutcome, bool)> {
    report
        .hosts
        .iter()
        .map(|h| (h.outcome, h.in_pool))
        .collect()
}

mod resuming;
mod rolling;
mod strategies;
