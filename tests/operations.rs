//! The commands that select, inspect and check a fleet, end to end on a real local fleet:
//! `--hosts` / `--tag`, `roller status`, `roller history` and `roller check`.

mod e2e;

use std::collections::BTreeSet;

use e2e::*;
use roller_fleet::{Fleet, FleetSpec, JarSpec};

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_selection_rolls_out_only_the_selected_hosts() {
    let fleet = Fleet::up(FleetSpec::for_test("select", 3)).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let inventory = fleet.inventory_path();

    let nothing = roller(&rollout_args(
        &inventory,
        &v2,
        "v2",
        "1",
        &["--tag", "az-z"],
    ));
    assert_eq!(nothing.code, Some(2), "{}", nothing.stderr);
    assert!(
        nothing.stderr.contains("--tag az-z selects no host"),
        "{}",
        nothing.stderr
    );

    let load = start_load(&fleet);
    let run = roller(&rollout_args(
        &inventory,
        &v2,
        "v2",
        "1",
        &["--hosts", "web-1,web-3"],
    ));
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        report_hosts(&run),
        [
            ("web-1".to_string(), "updated".to_string(), true),
            ("web-2".to_string(), "untouched".to_string(), true),
            ("web-3".to_string(), "updated".to_string(), true),
        ]
    );
    assert_eq!(run.touched("switch"), names(&["web-1", "web-3"]));
    assert_eq!(run.touched("restart"), names(&["web-1", "web-3"]));
    assert_eq!(run.touched("stage"), names(&["web-1", "web-3"]));
    assert_no_failed_requests(&traffic);
    assert_eq!(fleet.live_release("web-1").as_deref(), Some("v2"));
    assert_eq!(fleet.live_release("web-2").as_deref(), Some("v1"));
    assert_eq!(fleet.live_release("web-3").as_deref(), Some("v2"));
    assert!(!fleet.host_dir("web-2").join("shop/releases/v2").exists());
    assert_eq!(fleet.app_version("web-2").as_deref(), Some("v1"));
    assert_eq!(fleet.upstream_text().matches(" down").count(), 0);
}
