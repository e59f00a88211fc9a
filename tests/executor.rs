//! The executor's decisions (order, rollback, reporting) over an in-memory fleet: what a real
//! server would add here is only latency.

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

#[tokio::test]
async fn a_good_release_reaches_every_host_one_batch_at_a_time() {
    let world = world();
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();

    assert_eq!(report.outcome, Outcome::Succeeded);
    assert!(
        report
            .hosts
            .iter()
            .all(|h| h.outcome == HostOutcome::Updated && h.in_pool)
    );
    assert_eq!(releases(&world), vec![("v2".into(), "v2".into()); 3]);
    let w = world.lock().unwrap();
    // One reload per batch boundary: web-1 out; web-1 back and web-2 out in one rewrite; then
    // web-2 back and web-3 out; then web-3 back. Four for three batches, one host down at a time.
    assert_eq!(w.upstream_history.len(), 4, "{:#?}", w.upstream_history);
    for (i, content) in w.upstream_history.iter().enumerate() {
        let downs = content.matches(" down;").count();
        assert_eq!(downs, if i < 3 { 1 } else { 0 }, "{content}");
        if i < 3 {
            assert!(
                content.contains(&format!("10.0.1.{}:8080 down;", i + 1)),
                "{content}"
            );
        }
    }
    assert!(!w.upstream.contains("down"));
    drop(w);
    // Saved at the start, with every pool change (where it leads), and at the end.
    let saved = world.lock().unwrap().saved_states.clone();
    let (p, d) = (Progress::Pending, Progress::Drained);
    let done = Progress::Done;
    assert_eq!(
        saved.iter().map(progress).collect::<Vec<_>>(),
        vec![
            vec![p, p, p],
            vec![d, p, p],
            vec![done, d, p],
            vec![done, done, d],
            vec![done; 3],
            vec![done; 3],
        ]
    );
    assert!(saved[..5].iter().all(|s| s.status == Status::Running));
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Succeeded);
    assert!(last.out_of_pool.is_empty(), "{last:?}");
}

#[tokio::test]
async fn within_a_batch_the_host_changes_only_after_it_left_the_pool_and_drained() {
    let world = world();
    // A moment without connections is not a drain: one opens again after it.
    world.lock().unwrap().in_flight = vec![3, 1, 0, 2];
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    assert_eq!(result.unwrap().outcome, Outcome::Succeeded);

    let calls = fleet.calls();
    let position = |pred: &dyn Fn(&Call) -> bool| calls.iter().position(pred).unwrap();
    let exec_on = |target: &'static str, marker: &'static str| move |c: &Call| matches!(c, Call::Exec { target: t, command, .. } if t == target && command.contains(marker));
    let removed = position(&exec_on("lb-1", ".roller-new"));
    let drained_polls = calls
        .iter()
        .filter(|c| matches!(c, Call::Exec { command, .. } if command.starts_with("ss -Htn")))
        .count();
    let last_busy_poll = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c, Call::Exec { command, .. } if command.starts_with("ss -Htn")))
        .map(|(i, _)| i)
        .nth(3)
        .unwrap();
    let switched = position(&exec_on("web-1", "mv -T"));
    let restarted = position(
        &|c: &Call| matches!(c, Call::Exec { target, command, .. } if target == "web-1" && command == "restart-app"),
    );
    let checked = restarted
        + calls[restarted..]
            .iter()
            .position(|c| matches!(c, Call::HttpGet { target, .. } if target == "web-1"))
            .unwrap();
    assert!(removed < last_busy_poll && last_busy_poll < switched);
    // After the last busy poll, quiet polls for balancer.drain_quiet (100ms, 50ms apart).
    let quiet_polls = calls[last_busy_poll + 1..switched]
        .iter()
        .filter(|c| matches!(c, Call::Exec { command, .. } if command.starts_with("ss -Htn")))
        .count();
    assert!(quiet_polls >= 3, "{quiet_polls} quiet polls");
    assert!(
        switched < restarted && restarted < checked,
        "{switched} {restarted} {checked}"
    );
    // Each of the three batches polls until it has been quiet for a while.
    assert!(drained_polls >= 4 + 3 + 3 + 3, "{drained_polls} polls");
}

#[tokio::test]
async fn once_no_worker_from_before_the_reload_is_left_one_sample_without_connections_is_the_drain()
{
    let world = world();
    {
        let mut w = world.lock().unwrap();
        w.reports_retiring = true;
        w.in_flight = vec![2, 1, 0];
    }
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    assert_eq!(result.unwrap().outcome, Outcome::Succeeded);
    let polls = fleet
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Exec { command, .. } if command.starts_with("ss -Htn")))
        .count();
    // Batch 1 waits out its two busy samples, then each batch stops at its first quiet one:
    // no quiet window is waited once nothing routes with the old pool.
    assert_eq!(polls, 3 + 1 + 1);
}

#[tokio::test]
async fn an_unhealthy_release_is_rolled_back_in_its_batch_and_goes_no_further() {
    let world = world();
    world.lock().unwrap().healthy = vec!["v1".into()];
    let fleet = fleet(world.clone());
    let (result, events) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();

    assert_eq!(report.outcome, Outcome::RolledBack);
    let failure = report.failure.as_ref().unwrap();
    assert_eq!((failure.batch, failure.failure.host.as_str()), (1, "web-1"));
    assert_eq!(failure.failure.step, "health-check");
    assert!(failure.failure.message.contains("HTTP 503"), "{failure:?}");
    let outcomes: Vec<_> = report
        .hosts
        .iter()
        .map(|h| (h.outcome, h.in_pool))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (HostOutcome::RolledBack, true),
            (HostOutcome::Untouched, true),
            (HostOutcome::Untouched, true)
        ]
    );
    assert_eq!(report.hosts[0].release.as_deref(), Some("v1"));
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
    assert!(!world.lock().unwrap().upstream.contains("down"));
    let last = last_saved(&world);
    assert_eq!(last.status, Status::RolledBack);
    assert_eq!(
        progress(&last),
        [Progress::RolledBack, Progress::Pending, Progress::Pending]
    );
    assert!(last.out_of_pool.is_empty(), "{last:?}");
    // Later batches were never touched beyond pre-flight and staging.
    for host in ["web-2", "web-3"] {
        assert!(
            fleet
                .commands(host)
                .iter()
                .all(|c| !c.contains("mv -T") && c != "restart-app"),
            "{host} was changed"
        );
    }
    assert!(
        events
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.state == StepState::Failed)
    );
}

#[tokio::test]
async fn a_host_that_cannot_be_restored_stays_out_of_the_pool_and_is_reported() {
    let world = world();
    world.lock().unwrap().broken = vec!["web-1".into()];
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();

    assert_eq!(report.outcome, Outcome::RollbackIncomplete);
    assert_eq!(report.hosts[0].outcome, HostOutcome::Failed);
    assert!(!report.hosts[0].in_pool);
    assert!(
        world
            .lock()
            .unwrap()
            .upstream
            .contains("10.0.1.1:8080 down;")
    );
    assert_eq!(report.recovery.len(), 1);
    assert!(
        report.recovery[0].contains("web-1"),
        "{:?}",
        report.recovery
    );
    assert!(report.recovery[0].contains("/etc/nginx/conf.d/shop.conf"));
    // What resume and recover read agrees with the report.
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Incomplete);
    assert_eq!(last.hosts["web-1"], Progress::Failed);
    assert_eq!(last.out_of_pool, ["web-1"]);
}

#[tokio::test]
async fn a_changed_host_key_stops_everything_before_any_command() {
    let world = world();
    let fleet = fleet(world.clone()).refuse(
        "web-2",
        TransportError::HostKeyChanged {
            host: "10.0.1.2".into(),
            fingerprint: "SHA256:abc".into(),
            known_hosts: "/dev/null".into(),
            line: 3,
        },
    );
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    match result {
        Err(Error::Preflight { failures }) => {
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].host, "web-2");
            assert!(failures[0].message.contains("does not match"));
        }
        other => panic!("expected a pre-flight failure, got {other:?}"),
    }
    assert!(fleet.calls().is_empty());
}

#[tokio::test]
async fn a_failing_nginx_test_stops_everything_before_a_host_leaves_the_pool() {
    let world = world();
    world.lock().unwrap().lb_test_fails = true;
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    match result {
        Err(Error::Preflight { failures }) => {
            assert_eq!(failures[0].host, "lb-1");
            assert!(failures[0].message.contains("unknown directive"));
        }
        other => panic!("expected a pre-flight failure, got {other:?}"),
    }
    assert!(world.lock().unwrap().upstream_history.is_empty());
    assert!(fleet.commands("web-1").iter().all(|c| !c.contains(".part")));
}

#[tokio::test]
async fn a_drain_that_never_ends_fails_the_batch_without_touching_the_host() {
    let world = world();
    world.lock().unwrap().in_flight = vec![1; 1000];
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(2)).await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(report.failure.as_ref().unwrap().failure.step, "drain");
    assert!(
        report
            .failure
            .as_ref()
            .unwrap()
            .failure
            .message
            .contains("balancer.drain_timeout (2s) ended the wait, not the drain: 1 connection(s)"),
        "{:?}",
        report.failure
    );
    assert!(fleet.commands("web-1").iter().all(|c| c != "restart-app"));
    assert!(!world.lock().unwrap().upstream.contains("down"));
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
}

#[tokio::test]
async fn a_drain_interrupted_by_new_connections_is_not_taken_for_done() {
    let world = world();
    // Never two quiet polls in a row.
    world.lock().unwrap().in_flight = [0, 1].repeat(1000);
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    let failure = &report.failure.as_ref().unwrap().failure;
    assert_eq!(failure.step, "drain");
    assert!(
        failure.message.contains("ended the wait, not the drain"),
        "{failure:?}"
    );
    assert!(fleet.commands("web-1").iter().all(|c| c != "restart-app"));
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
}

fn outcomes(report: &RolloutReport) -> Vec<(HostOutcome, bool)> {
    report
        .hosts
        .iter()
        .map(|h| (h.outcome, h.in_pool))
        .collect()
}

#[tokio::test]
async fn rollback_all_undoes_earlier_batches_too_draining_them_first() {
    let world = world();
    world.lock().unwrap().sick_on_v2 = vec!["web-2".into()];
    let fleet = fleet(world.clone());
    let (result, _) = rollout_with(
        &fleet,
        BatchSize::Hosts(1),
        options(FailurePolicy::RollbackAll, 0),
        executor::never_interrupted(),
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(report.failure.as_ref().unwrap().batch, 2);
    assert_eq!(
        outcomes(&report),
        vec![
            (HostOutcome::RolledBack, true),
            (HostOutcome::RolledBack, true),
            (HostOutcome::Untouched, true)
        ]
    );
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
    // web-1 was taken out of the pool again before it was switched back: web-1 out; web-1
    // back with web-2 out; web-2 back after its rollback; web-1 out for its undo; all back.
    let w = world.lock().unwrap();
    let undo_out = w
        .upstream_history
        .iter()
        .rposition(|u| u.contains("10.0.1.1:8080 down;"))
        .unwrap();
    assert_eq!(undo_out, 3, "{:#?}", w.upstream_history);
    assert_eq!(w.upstream_history.len(), 5, "{:#?}", w.upstream_history);
    assert!(!w.upstream.contains("down"));
    drop(w);
    let last = last_saved(&world);
    assert_eq!(last.status, Status::RolledBack);
    assert_eq!(
        progress(&last),
        [
            Progress::RolledBack,
            Progress::RolledBack,
            Progress::Pending
        ]
    );
}

#[tokio::test]
async fn halt_leaves_the_failed_batch_out_of_the_pool_and_says_how_to_go_on() {
    let world = world();
    world.lock().unwrap().sick_on_v2 = vec!["web-1".into()];
    let fleet = fleet(world.clone());
    let (result, _) = rollout_with(
        &fleet,
        BatchSize::Hosts(1),
        options(FailurePolicy::Halt, 0),
        executor::never_interrupted(),
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Halted);
    assert_eq!(
        outcomes(&report),
        vec![
            (HostOutcome::Halted, false),
            (HostOutcome::Untouched, true),
            (HostOutcome::Untouched, true)
        ]
    );
    assert!(
        world
            .lock()
            .unwrap()
            .upstream
            .contains("10.0.1.1:8080 down;")
    );
    assert_eq!(world.lock().unwrap().current["web-1"], "v2");
    assert!(
        report.recovery[0].contains("roller resume"),
        "{:?}",
        report.recovery
    );
    assert!(report.recovery[0].contains("roller recover"));
    // Resume finds the halted host out of the pool, restarted on the new release.
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Halted);
    assert_eq!(last.out_of_pool, ["web-1"]);
    assert_eq!(
        progress(&last),
        [Progress::Restarted, Progress::Pending, Progress::Pending]
    );
}

#[tokio::test]
async fn max_failed_hosts_rolls_a_failing_host_back_alone_and_carries_on() {
    let world = world();
    world.lock().unwrap().sick_on_v2 = vec!["web-2".into()];
    let fleet = fleet(world.clone());
    let (result, _) = rollout_with(
        &fleet,
        BatchSize::Hosts(1),
        options(FailurePolicy::RollbackBatch, 1),
        executor::never_interrupted(),
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert!(report.failure.is_none());
    assert_eq!(
        outcomes(&report),
        vec![
            (HostOutcome::Updated, true),
            (HostOutcome::RolledBack, true),
            (HostOutcome::Updated, true)
        ]
    );
    assert_eq!(
        releases(&world),
        vec![
            ("v2".into(), "v2".into()),
            ("v1".into(), "v1".into()),
            ("v2".into(), "v2".into())
        ]
    );
    assert!(
        report.headline().contains("but web-2"),
        "{}",
        report.headline()
    );
    let last = last_saved(&world);
    assert_eq!(last.status, Status::RolledBack);
    assert_eq!(
        progress(&last),
        [Progress::Done, Progress::RolledBack, Progress::Done]
    );
    assert!(last.out_of_pool.is_empty(), "{last:?}");
}

#[tokio::test]
async fn one_failure_too_many_fails_the_batch() {
    let world = world();
    world.lock().unwrap().sick_on_v2 = vec!["web-1".into(), "web-2".into()];
    let fleet = fleet(world.clone());
    let (result, _) = rollout_with(
        &fleet,
        BatchSize::Hosts(1),
        options(FailurePolicy::RollbackBatch, 1),
        executor::never_interrupted(),
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.failure.as_ref().unwrap().batch, 2);
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
}

#[tokio::test]
async fn hosts_already_on_the_release_and_healthy_are_skipped() {
    let world = world();
    {
        let mut w = world.lock().unwrap();
        w.current.insert("web-1".into(), "v2".into());
        w.running.insert("web-1".into(), "v2".into());
    }
    let fleet = fleet(world.clone());
    let (result, events) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded);
    assert!(fleet.commands("web-1").iter().all(|c| c != "restart-app"));
    let batches: BTreeSet<usize> = events
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| e.batch)
        .collect();
    assert_eq!(batches.len(), 2);
    assert_eq!(releases(&world), vec![("v2".into(), "v2".into()); 3]);
}

#[tokio::test]
async fn unhealthy_hosts_go_first_and_the_capacity_guard_refuses_a_batch_that_leaves_too_few() {
    let world = world();
    {
        let mut w = world.lock().unwrap();
        w.running.insert("web-2".into(), "crashed".into());
        w.running.insert("web-3".into(), "crashed".into());
    }
    let fleet = fleet(world.clone());
    let inventory = INVENTORY.replace(
        "drain_timeout = \"2s\"",
        "drain_timeout = \"2s\"\nmin_healthy = 2",
    );
    let (result, _) = rollout_on(&inventory, &fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();
    let failure = report.failure.as_ref().unwrap();
    assert_eq!(failure.failure.step, "capacity-check");
    assert!(
        failure
            .failure
            .message
            .contains("below balancer.min_healthy = 2"),
        "{failure:?}"
    );
    // Nothing was taken out of the pool and no host was touched.
    assert!(world.lock().unwrap().upstream_history.is_empty());
    for host in ["web-1", "web-2", "web-3"] {
        assert!(
            fleet.commands(host).iter().all(|c| c != "restart-app"),
            "{host}"
        );
    }
}

#[tokio::test]
async fn a_healthy_batch_returns_alone_when_the_next_may_not_leave_the_pool() {
    let world = world();
    let inner = fleet(world.clone());
    let w = world.clone();
    // web-3 stops answering its health check once web-1 runs the new release: by the end of
    // batch 1, taking web-2 out would leave one healthy host (web-1) of the two required.
    let fleet = MemoryFleet::new(
        {
            let inner = inner.clone();
            move |t: &str, c: &str, i: Option<&bytes::Bytes>| inner.answer(t, c, i)
        },
        move |t: &str, a: &str, p: u16, path: &str| {
            let web1_on_v2 =
                w.lock().unwrap().running.get("web-1").map(String::as_str) == Some("v2");
            if t == "web-3" && web1_on_v2 {
                return Ok(503);
            }
            inner.probe(t, a, p, path)
        },
    );
    let inventory = INVENTORY.replace(
        "drain_timeout = \"2s\"",
        "drain_timeout = \"2s\"\nmin_healthy = 2",
    );
    let (result, _) = rollout_on(&inventory, &fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();
    let failure = report.failure.as_ref().unwrap();
    assert_eq!(failure.batch, 2);
    assert_eq!(failure.failure.step, "capacity-check");
    // Batch 2 is reported as a refused batch always is: back (it never left), in the pool.
    assert_eq!(
        outcomes(&report),
        vec![
            (HostOutcome::Updated, true),
            (HostOutcome::RolledBack, true),
            (HostOutcome::Untouched, true)
        ]
    );
    // web-1 out, then back on its own; web-2 never left.
    let w = world.lock().unwrap();
    assert_eq!(w.upstream_history.len(), 2, "{:#?}", w.upstream_history);
    assert!(w.upstream_history[0].contains("10.0.1.1:8080 down;"));
    assert!(!w.upstream.contains("down"), "{}", w.upstream);
    drop(w);
    assert!(fleet.commands("web-2").iter().all(|c| c != "restart-app"));
    assert_eq!(
        releases(&world),
        vec![
            ("v2".into(), "v2".into()),
            ("v1".into(), "v1".into()),
            ("v1".into(), "v1".into())
        ]
    );
}

#[tokio::test]
async fn a_failure_in_a_batch_taken_out_at_the_handover_returns_it_to_the_pool() {
    let world = world();
    world.lock().unwrap().sick_on_v2 = vec!["web-2".into()];
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(report.failure.as_ref().unwrap().batch, 2);
    assert_eq!(
        outcomes(&report),
        vec![
            (HostOutcome::Updated, true),
            (HostOutcome::RolledBack, true),
            (HostOutcome::Untouched, true)
        ]
    );
    let w = world.lock().unwrap();
    // web-1 out; web-1 back with web-2 out; web-2 back after its rollback.
    assert_eq!(w.upstream_history.len(), 3, "{:#?}", w.upstream_history);
    assert!(w.upstream_history[1].contains("10.0.1.2:8080 down;"));
    assert_eq!(w.upstream_history[1].matches(" down;").count(), 1);
    assert!(!w.upstream.contains("down"), "{}", w.upstream);
}

#[tokio::test]
async fn an_interrupt_during_the_health_check_rolls_the_batch_back() {
    let world = world();
    world.lock().unwrap().sick_on_v2 = vec!["web-1".into()];
    let (tx, interrupt) = tokio::sync::watch::channel(None);
    let tx = Arc::new(tx);
    // Interrupt as soon as web-1's new release is being health-checked.
    let inner = fleet(world.clone());
    let w = world.clone();
    let trigger = tx.clone();
    let fleet = MemoryFleet::new(
        {
            let inner = inner.clone();
            move |t: &str, c: &str, i: Option<&bytes::Bytes>| inner.answer(t, c, i)
        },
        move |t: &str, a: &str, p: u16, path: &str| {
            if w.lock().unwrap().running.get(t).map(String::as_str) == Some("v2") {
                let _ = trigger.send(Some("SIGINT received".into()));
            }
            inner.probe(t, a, p, path)
        },
    );
    let inventory = INVENTORY.replace("timeout = \"20ms\"", "timeout = \"30s\"");
    let (result, _) = rollout_full(
        &inventory,
        &fleet,
        BatchSize::Hosts(1),
        Options::default(),
        interrupt,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Interrupted);
    assert_eq!(report.interrupted.as_deref(), Some("SIGINT received"));
    assert!(
        report.notes[0].contains("rolled back"),
        "{:?}",
        report.notes
    );
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
    assert!(!world.lock().unwrap().upstream.contains("down"));
    assert!(report.hosts.iter().all(|h| h.in_pool));
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Interrupted);
    assert_eq!(last.hosts["web-1"], Progress::RolledBack);
    assert!(last.out_of_pool.is_empty(), "{last:?}");
}

#[tokio::test]
async fn an_interrupt_once_the_batch_is_healthy_completes_it_instead() {
    let world = world();
    let (tx, interrupt) = tokio::sync::watch::channel(None);
    let inner = fleet(world.clone());
    let w = world.clone();
    let fleet = MemoryFleet::new(
        {
            let inner = inner.clone();
            move |t: &str, c: &str, i: Option<&bytes::Bytes>| inner.answer(t, c, i)
        },
        move |t: &str, a: &str, p: u16, path: &str| {
            let answer = inner.probe(t, a, p, path);
            let on_v2 = w.lock().unwrap().running.get(t).map(String::as_str) == Some("v2");
            if on_v2 && answer == Ok(200) {
                let _ = tx.send(Some("SIGTERM received".into()));
            }
            answer
        },
    );
    let (result, _) = rollout_full(
        INVENTORY,
        &fleet,
        BatchSize::Hosts(1),
        Options::default(),
        interrupt,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Interrupted);
    assert!(
        report.notes[0].contains("completed rather than rolled back"),
        "{:?}",
        report.notes
    );
    assert_eq!(
        releases(&world),
        vec![
            ("v2".into(), "v2".into()),
            ("v1".into(), "v1".into()),
            ("v1".into(), "v1".into())
        ]
    );
    assert!(!world.lock().unwrap().upstream.contains("down"));
    // The next batch was never taken out: web-1 returned alone.
    let history = world.lock().unwrap().upstream_history.clone();
    assert_eq!(history.len(), 2, "{history:#?}");
    assert!(history.iter().all(|u| !u.contains("10.0.1.2:8080 down")));
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Interrupted);
    assert_eq!(
        progress(&last),
        [Progress::Done, Progress::Pending, Progress::Pending]
    );
    assert!(last.out_of_pool.is_empty(), "{last:?}");
}

/// The index of the first restart on `host`.
fn restarted_at(fleet: &MemoryFleet, host: &str) -> usize {
    fleet
        .calls()
        .iter()
        .position(|c| matches!(c, Call::Exec { target, command, .. } if target == host && command == "restart-app"))
        .unwrap_or_else(|| panic!("{host} was never restarted"))
}

#[tokio::test]
async fn recover_takes_each_host_to_its_own_release_and_leaves_those_already_there() {
    let world = world();
    {
        let mut w = world.lock().unwrap();
        // A killed rollout left web-1 on v2; web-2 ran v0 before it and was switched too.
        for (host, release, previous) in [("web-1", "v2", "v1"), ("web-2", "v2", "v0")] {
            w.current.insert(host.into(), release.into());
            w.current
                .insert(format!("{host}.previous"), previous.into());
            w.running.insert(host.into(), release.into());
        }
        w.healthy = vec!["v0".into(), "v1".into(), "v2".into()];
    }
    let fleet = fleet(world.clone());
    let targets = BTreeMap::from([
        ("web-1".to_string(), "v1".to_string()),
        ("web-2".to_string(), "v0".to_string()),
        ("web-3".to_string(), "v1".to_string()),
    ]);
    let (result, _) = rollout_to(
        Target {
            release: "v1",
            targets: Some(targets),
            unfinished: BTreeSet::from(["web-2".to_string()]),
            ..Target::default()
        },
        &fleet,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded);
    assert_eq!(
        releases(&world),
        [("v1", "v1"), ("v0", "v0"), ("v1", "v1")].map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let released: Vec<Option<&str>> = report.hosts.iter().map(|h| h.release.as_deref()).collect();
    assert_eq!(released, [Some("v1"), Some("v0"), Some("v1")]);
    // web-3 already ran its release; web-2, left partway, went before web-1.
    assert!(fleet.commands("web-3").iter().all(|c| c != "restart-app"));
    assert!(restarted_at(&fleet, "web-2") < restarted_at(&fleet, "web-1"));
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Succeeded);
    assert_eq!(progress(&last), [Progress::Done; 3]);
}

#[tokio::test]
async fn resume_redeploys_a_host_left_partway_first_even_if_it_runs_the_release() {
    let world = world();
    {
        let mut w = world.lock().unwrap();
        w.current.insert("web-3".into(), "v2".into());
        w.current.insert("web-3.previous".into(), "v1".into());
        w.running.insert("web-3".into(), "v2".into());
    }
    let fleet = fleet(world.clone());
    let (result, _) = rollout_to(
        Target {
            unfinished: BTreeSet::from(["web-3".to_string()]),
            ..Target::default()
        },
        &fleet,
    )
    .await;
    assert_eq!(result.unwrap().outcome, Outcome::Succeeded);
    assert_eq!(releases(&world), vec![("v2".into(), "v2".into()); 3]);
    assert!(restarted_at(&fleet, "web-3") < restarted_at(&fleet, "web-1"));
    assert!(restarted_at(&fleet, "web-1") < restarted_at(&fleet, "web-2"));
    assert_eq!(progress(&last_saved(&world)), [Progress::Done; 3]);
}

const BLUE_GREEN: &str = r#"
strategy = "blue-green"
[blue_green]
restart = "start-slot {slot}"
stop = "stop-slot {slot}"
"#;

/// Every host serves v1 from its blue slot; green never ran.
fn blue_world() -> Arc<Mutex<World>> {
    let world = world();
    {
        let mut w = world.lock().unwrap();
        for h in ["web-1", "web-2", "web-3"] {
            w.slots.insert(format!("{h}/blue"), "v1".into());
            w.slots_running.insert(format!("{h}/blue"), "v1".into());
        }
        let inv = Inventory::parse(&blue_green_inventory()).unwrap();
        let balancer = Nginx::new(&inv.balancer, &inv.app, &inv.hosts);
        w.upstream = balancer.render(&roller::balancer::Pool {
            port: Some(8081),
            ..Default::default()
        });
    }
    world
}

fn blue_green_inventory() -> String {
    format!("{BLUE_GREEN}{INVENTORY}")
}

fn leaked(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

#[tokio::test]
async fn blue_green_starts_every_idle_slot_then_moves_all_traffic_in_one_change() {
    let world = blue_world();
    let inventory = leaked(blue_green_inventory());
    let fleet = fleet_of(inventory, world.clone());
    let (result, _) = rollout_to(
        Target {
            inventory,
            ..Target::default()
        },
        &fleet,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded);
    let w = world.lock().unwrap();
    for h in ["web-1", "web-2", "web-3"] {
        assert_eq!(w.slots_running[&format!("{h}/green")], "v2", "{h}");
        // The old slot keeps running, for switch-back, until its timer stops it.
        assert_eq!(w.slots_running[&format!("{h}/blue")], "v1", "{h}");
    }
    assert_eq!(w.keeping_old, ["web-1", "web-2", "web-3"]);
    // One pool change, to the green port, with nobody out of the pool.
    assert_eq!(w.upstream_history.len(), 1, "{:#?}", w.upstream_history);
    assert!(w.upstream.contains("10.0.1.1:8082;"), "{}", w.upstream);
    assert!(!w.upstream.contains("down"), "{}", w.upstream);
    drop(w);
    // No host moved traffic before every green slot was healthy.
    let calls = fleet.calls();
    let switched_traffic = calls
        .iter()
        .position(|c| {
            matches!(c, Call::Exec { command, .. } if classify(inventory, command) == Some(Op::SetPool))
        })
        .unwrap();
    let last_probe = calls
        .iter()
        .rposition(|c| matches!(c, Call::HttpGet { port: 8082, .. }))
        .unwrap();
    assert!(last_probe < switched_traffic);
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Succeeded);
    assert_eq!(progress(&last), [Progress::Done; 3]);
    let released: Vec<Option<&str>> = report.hosts.iter().map(|h| h.release.as_deref()).collect();
    assert_eq!(released, [Some("v2"); 3]);
}

#[tokio::test]
async fn a_green_slot_that_never_turns_healthy_never_gets_traffic_and_is_stopped() {
    let world = blue_world();
    world.lock().unwrap().sick_on_v2 = vec!["web-2".into()];
    let inventory = leaked(blue_green_inventory());
    let fleet = fleet_of(inventory, world.clone());
    let (result, _) = rollout_to(
        Target {
            inventory,
            ..Target::default()
        },
        &fleet,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(report.failure.as_ref().unwrap().failure.host, "web-2");
    let w = world.lock().unwrap();
    assert!(w.upstream_history.is_empty(), "{:#?}", w.upstream_history);
    for h in ["web-1", "web-2", "web-3"] {
        assert!(!w.slots_running.contains_key(&format!("{h}/green")), "{h}");
        assert_eq!(w.slots_running[&format!("{h}/blue")], "v1", "{h}");
    }
    drop(w);
    let released: Vec<Option<&str>> = report.hosts.iter().map(|h| h.release.as_deref()).collect();
    assert_eq!(released, [Some("v1"); 3]);
    let last = last_saved(&world);
    assert_eq!(last.status, Status::RolledBack);
    assert_eq!(progress(&last), [Progress::RolledBack; 3]);
    assert!(last.out_of_pool.is_empty(), "{last:?}");
}

const CANARY: &str = r#"
strategy = "canary"
[canary]
hosts = 1
weights = [20, 100]
hold = "1ms"
access_log = "/var/log/nginx/shop-roller.log"
min_requests = 5
"#;

/// A hold's access log: `canary` requests to web-1 with `status`, 20 good ones to web-2.
fn hold(canary: usize, status: u16) -> String {
    let mut lines = format!("10.0.1.1:8080 {status} 0.010\n").repeat(canary);
    lines.push_str(&"10.0.1.2:8080 200 0.010\n".repeat(20));
    lines
}

#[tokio::test]
async fn a_canary_steps_through_its_weights_and_the_rest_follows_once_it_is_judged_good() {
    let world = world();
    world.lock().unwrap().holds = vec![hold(5, 200), hold(20, 200)];
    let inventory = leaked(format!("{CANARY}{INVENTORY}"));
    let fleet = fleet_of(inventory, world.clone());
    let (result, _) = rollout_to(
        Target {
            inventory,
            ..Target::default()
        },
        &fleet,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded, "{report:?}");
    assert!(
        report.notes.iter().any(|n| n.contains("at 20%")),
        "{:?}",
        report.notes
    );
    assert_eq!(releases(&world), vec![("v2".into(), "v2".into()); 3]);
    let w = world.lock().unwrap();
    // web-1 out; back at weight 20; back in full; then the others, one batch at a time.
    assert!(
        w.upstream_history[1].contains("10.0.1.1:8080 weight=20;"),
        "{:#?}",
        w.upstream_history
    );
    assert!(w.upstream_history[1].contains("10.0.1.2:8080 weight=100;"));
    assert!(
        !w.upstream_history[2].contains("weight"),
        "{}",
        w.upstream_history[2]
    );
    assert!(w.holds.is_empty());
    drop(w);
    assert_eq!(last_saved(&world).status, Status::Succeeded);
}

#[tokio::test]
async fn a_canary_answering_5xx_leaves_the_pool_drains_and_goes_back_to_its_release() {
    let world = world();
    world.lock().unwrap().holds = vec![hold(10, 502)];
    let inventory = leaked(format!("{CANARY}{INVENTORY}"));
    let fleet = fleet_of(inventory, world.clone());
    let (result, _) = rollout_to(
        Target {
            inventory,
            ..Target::default()
        },
        &fleet,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    let failure = &report.failure.as_ref().unwrap().failure;
    assert_eq!(failure.step, "observe");
    assert!(failure.message.contains("5xx rate"), "{failure:?}");
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
    let w = world.lock().unwrap();
    // Out, back at 20%, out again for the rollback, back in full.
    let downs: Vec<bool> = w
        .upstream_history
        .iter()
        .map(|u| u.contains("10.0.1.1:8080 down;"))
        .collect();
    assert_eq!(
        downs,
        [true, false, true, false],
        "{:#?}",
        w.upstream_history
    );
    assert!(!w.upstream.contains("weight"), "{}", w.upstream);
    drop(w);
    let last = last_saved(&world);
    assert_eq!(last.status, Status::RolledBack);
    assert_eq!(
        progress(&last),
        [Progress::RolledBack, Progress::Pending, Progress::Pending]
    );
}
