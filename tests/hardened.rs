//! Hosts as CIS-hardened images ship them: sshd with `AllowTcpForwarding no`, so nothing behind
//! a host is reachable through its SSH connection. Health checks are made from the host itself
//! instead, and when even that fails, the error says that forwarding was refused and where.

mod e2e;

use e2e::*;
use roller_fleet::{Fleet, FleetSpec, JarSpec};

#[test]
fn a_rollout_on_hosts_that_refuse_forwarding_checks_health_from_the_hosts() {
    let fleet = Fleet::up(FleetSpec::for_test("hardened", 2).with_forwarding_refused()).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let load = start_load(&fleet);

    let run = rollout(&fleet.inventory_path(), &v2, "v2", "1");
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.report()["outcome"], "succeeded");
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v2", "v2");
}

#[test]
fn when_no_check_works_pre_flight_names_the_refused_forwarding_and_the_hosts() {
    let fleet =
        Fleet::up(FleetSpec::for_test("hardened_fail", 2).with_forwarding_refused()).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    // A check from the host that cannot run there, as on a host without the tool it names.
    let inventory = inventory_with(
        &fleet,
        &[(
            "health",
            "command",
            "no-such-health-probe /actuator/health".into(),
        )],
    );

    let run = rollout(&inventory, &v2, "v2", "1");

    assert_eq!(run.code, Some(3), "pre-flight refuses: {}", run.stderr);
    let message = run.error()["message"].to_string();
    for host in ["web-1", "web-2"] {
        assert!(
            message.contains(&format!("{host}: sshd refuses port forwarding")),
            "{message}"
        );
    }
    assert!(
        message.contains("health.command could not run (exit 127)"),
        "{message}"
    );
    assert!(
        !run.lines.iter().any(|l| l["step"]["phase"] == "stage"),
        "nothing staged"
    );
    assert_eq!(fleet.live_release("web-1").as_deref(), Some("v1"));
    assert_eq!(fleet.live_release("web-2").as_deref(), Some("v1"));
}
