//! `roller rollback` end to end on a real local fleet: back to the release before the live one
//! under steady GET and POST traffic with no upload, to a named release, and refused with
//! nothing changed when a host lacks the release.

mod e2e;

use std::collections::BTreeSet;
use std::path::Path;

use e2e::*;
use roller_fleet::{Fleet, FleetSpec, JarSpec, Mode};

fn rollback(inventory: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["--batch", "1"];
    args.extend(extra);
    admin("rollback", inventory, &args)
}

/// The release directories on every host, as the file system has them.
fn release_dirs(fleet: &Fleet) -> Vec<(String, BTreeSet<String>)> {
    fleet
        .host_names()
        .into_iter()
        .map(|host| {
            let dirs = std::fs::read_dir(fleet.host_dir(&host).join("shop/releases"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            (host, dirs)
        })
        .collect()
}

fn journal_text(inventory: &Path) -> String {
    let dir = journal_dir(inventory).join("shop");
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "jsonl") && !path.ends_with("locks.jsonl") {
            text.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    text
}

#[test]
fn rolls_back_to_the_previous_release_under_load_without_an_upload() {
    let fleet = Fleet::up(FleetSpec::for_test("rollback-load", 3)).unwrap();
    let inventory = fleet.inventory_path();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let run = rollout(&inventory, &v2, "v2", "1");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let dirs_before = release_dirs(&fleet);

    let load = start_load(&fleet);
    let run = rollback(&inventory, &[]);
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let report = run.report();
    assert_eq!(report["kind"], "rollback");
    assert_eq!(report["release"], "v1");
    assert_eq!(report["outcome"], "succeeded");
    for host in report["hosts"].as_array().unwrap() {
        assert_eq!(host["outcome"], "updated", "{host}");
        assert_eq!(host["release"], "v1", "{host}");
    }
    // Every host drained and switched, in batches of one, and nothing was uploaded.
    assert_eq!(run.touched("switch").len(), 3);
    assert!(run.touched("stage").is_empty(), "a rollback staged a jar");
    assert_eq!(
        release_dirs(&fleet),
        dirs_before,
        "release directories changed"
    );
    assert_no_failed_requests(&traffic);
    assert!(traffic.versions.contains_key("v1") && traffic.versions.contains_key("v2"));
    assert_fleet_on(&fleet, "v1", "v1");
    // The journal records the run as a rollback, so resume and recover know it needs no jar.
    assert!(
        journal_text(&inventory).contains("\"kind\":\"rollback\""),
        "the journal does not record a rollback"
    );
}

#[test]
fn rolls_back_to_a_named_release_and_a_second_rollback_returns() {
    let fleet = Fleet::up(FleetSpec::for_test("rollback-to", 2)).unwrap();
    let inventory = fleet.inventory_path();
    for release in ["v2", "v3"] {
        let jar = fleet.jar(&JarSpec::healthy(release)).unwrap();
        let run = rollout(&inventory, &jar, release, "1");
        assert_eq!(run.code, Some(0), "{}", run.stderr);
    }

    let run = rollback(&inventory, &["--to", "v1"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.report()["release"], "v1");
    assert_fleet_on(&fleet, "v1", "v1");

    // The release before the live one is now v3, the one this rollback left.
    let run = rollback(&inventory, &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.report()["release"], "v3");
    assert_fleet_on(&fleet, "v3", "v3");
}

#[test]
fn a_release_missing_on_a_host_is_refused_with_nothing_changed() {
    let fleet = Fleet::up(FleetSpec::for_test("rollback-missing", 2)).unwrap();
    let inventory = fleet.inventory_path();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let run = rollout(&inventory, &v2, "v2", "1");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let reloads = fleet.nginx_reloads();

    let refused_hosts = |run: &Run| -> BTreeSet<String> {
        run.error()["error"]["failures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["host"].as_str().unwrap().to_string())
            .collect()
    };
    let run = rollback(&inventory, &["--to", "v9"]);
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert_eq!(
        refused_hosts(&run),
        BTreeSet::from(["web-1".to_string(), "web-2".to_string()])
    );
    assert!(
        run.stderr.contains("release v9 is not on this host"),
        "{}",
        run.stderr
    );

    std::fs::remove_dir_all(fleet.host_dir("web-2").join("shop/releases/v1")).unwrap();
    let run = rollback(&inventory, &[]);
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert_eq!(refused_hosts(&run), BTreeSet::from(["web-2".to_string()]));
    assert!(run.touched("switch").is_empty() && run.touched("remove-from-pool").is_empty());
    assert_eq!(fleet.nginx_reloads(), reloads, "the pool changed");
    assert_fleet_on(&fleet, "v2", "v2");
}

/// A rollback is recorded as one: killed halfway, `roller resume` finishes it without a jar.
#[test]
fn resume_finishes_a_killed_rollback_without_an_artifact() {
    let fleet = Fleet::up(FleetSpec::for_test("rollback-resume", 3)).unwrap();
    let inventory = fleet.inventory_path();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let run = rollout(&inventory, &v2, "v2", "1");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let load = start_load(&fleet);

    let mut running = Running::start(&admin_args("rollback", &inventory, &["--batch", "1"]));
    running.wait_for_step("switch", "web-2", "succeeded");
    running.signal(libc::SIGKILL);
    assert_eq!(
        running.finish().code,
        None,
        "roller should have died by SIGKILL"
    );
    assert_eq!(fleet.live_release("web-1").as_deref(), Some("v1"));

    let run = admin("resume", &inventory, &[]);
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.report()["kind"], "rollback");
    assert_eq!(run.report()["release"], "v1");
    assert!(
        run.touched("stage").is_empty(),
        "a resumed rollback staged a jar"
    );
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v1", "v1");
}

/// Under blue-green the old slots still run the release before: a rollback sends traffic back
/// to them, as `roller switch-back` does, and refuses `--to`.
#[test]
fn under_blue_green_a_rollback_is_a_switch_back() {
    let fleet =
        Fleet::up(FleetSpec::for_test("rollback-bg", 2).with_mode(Mode::BlueGreen)).unwrap();
    let inventory = fleet.inventory_path();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let run = rollout(&inventory, &v2, "v2", "1");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(fleet.live_slot().as_deref(), Some("green"));
    let load = start_load(&fleet);

    let refused = admin("rollback", &inventory, &["--to", "v1"]);
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    let run = admin("rollback", &inventory, &[]);
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.touched("switch").is_empty() && run.touched("restart").is_empty());
    assert_eq!(fleet.live_slot().as_deref(), Some("blue"));
    for host in fleet.host_names() {
        assert_eq!(fleet.app_version(&host).as_deref(), Some("v1"), "{host}");
    }
    assert_no_failed_requests(&traffic);
}
