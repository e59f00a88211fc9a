//! Blue-green slots over their life, end to end on a real local fleet under steady load:
//! old slots stopped after keep_old, switch-back refused when they are gone, recover, and
//! adopting blue-green on a single-port fleet. A binary of its own, so that these long tests
//! do not run beside the timing-sensitive ones in `strategies.rs`.

mod e2e;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::*;
use roller_fleet::{Fleet, FleetSpec, JarSpec, Mode, RESTART_SLOT, STOP, STOP_SLOT};

fn blue_green(test: &str, hosts: usize) -> Fleet {
    Fleet::up(FleetSpec::for_test(test, hosts).with_mode(Mode::BlueGreen)).unwrap()
}

fn slot_pids(fleet: &Fleet, slot: &str) -> Vec<Option<u32>> {
    fleet
        .host_names()
        .iter()
        .map(|h| fleet.slot_pid(h, slot))
        .collect()
}

/// Waits until `slot` runs on no host; false past `timeout`.
fn wait_slot_stopped(fleet: &Fleet, slot: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while slot_pids(fleet, slot).iter().any(Option::is_some) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// The slots' life after releases, on one fleet under steady load: an abandoned slot is
/// stopped after keep_old (and a stale timer never stops the slot a later switch made live),
/// a switch-back to stopped slots is refused in words and changes nothing, and `roller
/// recover` after a killed release sends traffic back to the slot that had it.
#[test]
fn old_slots_stop_after_keep_old_switch_back_to_them_is_refused_and_recover_goes_back() {
    let fleet = blue_green("bg-lifecycle", 2);
    let keep_old = |d: &str| inventory_with(&fleet, &[("blue_green", "keep_old", d.into())]);
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let v3 = fleet.jar(&JarSpec::healthy("v3")).unwrap();
    let v4 = fleet.jar(&JarSpec::healthy("v4")).unwrap();
    let blue_before = slot_pids(&fleet, "blue");
    let load = start_load(&fleet);

    // A release, and a switch-back right after it: green is abandoned, and stops once
    // keep_old has passed; blue, whose own timer was pending, keeps serving.
    let inv = keep_old("15s");
    let run = rollout(&inv, &v2, "v2", "1");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.touched("prune").len(), 2, "{:#?}", run.lines);
    let back = admin("switch-back", &inv, &[]);
    assert_eq!(back.code, Some(0), "{}\n{:#?}", back.stderr, back.report());
    assert_eq!(fleet.live_slot().as_deref(), Some("blue"));
    assert!(
        slot_pids(&fleet, "green").iter().all(Option::is_some),
        "green stopped before keep_old"
    );
    assert!(
        wait_slot_stopped(&fleet, "green", Duration::from_secs(90)),
        "the slot a switch-back left was never stopped"
    );
    assert_eq!(slot_pids(&fleet, "blue"), blue_before, "blue was stopped");
    for host in fleet.host_names() {
        assert_eq!(fleet.slot_version(&host, "blue").as_deref(), Some("v1"));
        // Both slots' releases survive pruning.
        for release in ["v1", "v2"] {
            assert!(
                fleet
                    .host_dir(&host)
                    .join("shop/releases")
                    .join(release)
                    .is_dir(),
                "{host} lost {release}"
            );
        }
    }

    // A release whose old slots are gone by the time anyone asks for a switch-back.
    let inv = keep_old("1s");
    let run = rollout(&inv, &v3, "v3", "1");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(wait_slot_stopped(&fleet, "blue", Duration::from_secs(60)));
    let upstream = fleet.upstream_text();
    let reloads = fleet.nginx_reloads();
    let refused = admin("switch-back", &inv, &[]);
    assert_eq!(refused.code, Some(3), "{}", refused.stderr);
    let said = format!("{}{:?}", refused.stderr, refused.error());
    assert!(
        said.contains(
            "switch-back refused: blue does not answer on web-1, web-2 (stopped after keep_old, or down); traffic stays on green"
        ),
        "{said}"
    );
    assert_eq!(fleet.upstream_text(), upstream);
    assert_eq!(fleet.nginx_reloads(), reloads, "nginx was reloaded");
    assert_eq!(fleet.live_slot().as_deref(), Some("green"));

    // A release killed once traffic moved to its slots: recover sends it back to green.
    let inv = fleet.inventory_path();
    let mut running = Running::start(&rollout_args(&inv, &v4, "v4", "1", &[]));
    running.wait_for_step("switch-traffic", &fleet.lb_address(), "succeeded");
    running.signal(libc::SIGKILL);
    assert_eq!(running.finish().code, None);
    assert_eq!(fleet.live_slot().as_deref(), Some("blue"));
    let recovered = admin("recover", &inv, &[]);
    assert_eq!(recovered.code, Some(0), "{}", recovered.stderr);
    assert_eq!(fleet.live_slot().as_deref(), Some("green"));
    let traffic = load.stop();
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v3", "v3");
    // Closed: nothing is left to recover.
    assert_eq!(admin("recover", &inv, &[]).code, Some(3));
}

/// A fleet running one process per host on app.port moves to blue-green with its first
/// blue-green release: refused with the way forward until `blue_green.adopt_stop` is set, then
/// the release starts in blue, moves traffic there, and stops the single process after
/// keep_old, with no failed request.
#[test]
fn a_running_single_port_fleet_adopts_blue_green_without_failing_a_request() {
    let fleet = Fleet::up(FleetSpec::for_test("bg-adopt", 2)).unwrap();
    let adopting = |adopt_stop: Option<&str>| -> PathBuf {
        let text = std::fs::read_to_string(fleet.inventory_path()).unwrap();
        let mut doc: toml::Table = text.parse().unwrap();
        doc.insert("strategy".into(), "blue-green".into());
        let mut bg = toml::Table::new();
        bg.insert("restart".into(), format!("{RESTART_SLOT} {{slot}}").into());
        bg.insert("stop".into(), format!("{STOP_SLOT} {{slot}}").into());
        bg.insert("keep_old".into(), "10s".into());
        if let Some(stop) = adopt_stop {
            bg.insert("adopt_stop".into(), stop.into());
        }
        doc.insert("blue_green".into(), bg.into());
        let path = fleet.root().join("inventory-adopt.toml");
        std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
        path
    };
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let single: Vec<Option<u32>> = fleet
        .host_names()
        .iter()
        .map(|h| fleet.app_pid(h))
        .collect();
    assert!(single.iter().all(Option::is_some));
    let upstream = fleet.upstream_text();
    let load = start_load(&fleet);

    let refused = rollout(&adopting(None), &v2, "v2", "1");
    assert_eq!(refused.code, Some(3), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("set blue_green.adopt_stop"),
        "{}",
        refused.stderr
    );
    assert_eq!(fleet.upstream_text(), upstream);

    let run = rollout(&adopting(Some(STOP)), &v2, "v2", "1");
    let after_switch = fleet.access_log_len();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let blue = format!(":{}", fleet.slot_port("blue"));
    for host in fleet.host_names() {
        assert_eq!(fleet.slot_version(&host, "blue").as_deref(), Some("v2"));
    }
    // The single process keeps running for keep_old, like any old slot.
    let now: Vec<Option<u32>> = fleet
        .host_names()
        .iter()
        .map(|h| fleet.app_pid(h))
        .collect();
    assert_eq!(
        now, single,
        "the single-port process stopped before keep_old"
    );
    let served = load.snapshot().ok;
    assert!(load.wait_for_requests(served + 50, Duration::from_secs(30)));
    for (upstream, status) in fleet.served_since(after_switch) {
        assert!(
            upstream.ends_with(&blue) && status == 200,
            "{upstream} {status}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while fleet
        .host_names()
        .iter()
        .any(|h| fleet.app_pid(h).is_some())
    {
        assert!(
            Instant::now() < deadline,
            "adopt_stop never stopped the single-port process"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let traffic = load.stop();
    assert_no_failed_requests(&traffic);
    for host in fleet.host_names() {
        assert_eq!(fleet.slot_version(&host, "blue").as_deref(), Some("v2"));
    }
}
