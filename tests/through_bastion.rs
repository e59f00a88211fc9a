//! A fleet in a private network: the load balancer and the app hosts take SSH only from the
//! bastion's address, as a security group would have it, and the bastion runs OpenSSH's default
//! limits (`MaxStartups 10:30:100`). roller must roll out through it under load, with one
//! bastion connection carrying every host, and say which hosts it could not reach without it.

mod e2e;

use e2e::*;
use roller_fleet::{Bastion, Fleet, FleetSpec, JarSpec};

const HOSTS: usize = 12;

#[test]
fn a_rollout_under_load_reaches_twelve_hosts_only_through_the_bastion() {
    let fleet =
        Fleet::up(FleetSpec::for_test("via_bastion", HOSTS).with_bastion(Bastion::Only)).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let before = bastion_logins(&fleet);
    let load = start_load(&fleet);

    let run = rollout(&fleet.inventory_path(), &v2, "v2", "25%");
    let traffic = load.stop();

    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.report()["outcome"], "succeeded");
    assert_no_failed_requests(&traffic);
    assert_fleet_on(&fleet, "v2", "v2");
    // Thirteen hosts (twelve and the LB) at once: a bastion login per host, as `ssh -J`
    // makes them, would have met MaxStartups. roller logs in once per connector it opens.
    let logins = bastion_logins(&fleet) - before;
    assert!((1..=2).contains(&logins), "{logins} logins on the bastion");
}

#[test]
fn without_proxy_jump_pre_flight_names_the_hosts_it_cannot_reach() {
    let fleet = Fleet::up(FleetSpec::for_test("no_jump", 2).with_bastion(Bastion::Only)).unwrap();
    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let text = std::fs::read_to_string(fleet.inventory_path()).unwrap();
    assert!(text.contains("proxy_jump"), "{text}");
    let direct: String = text
        .lines()
        .filter(|l| !l.starts_with("proxy_jump"))
        .map(|l| format!("{l}\n"))
        .collect();
    let inventory = fleet.root().join("inventory-direct.toml");
    std::fs::write(&inventory, direct).unwrap();

    let run = rollout(&inventory, &v2, "v2", "1");

    assert_eq!(run.code, Some(3), "{}", run.stderr);
    let message = run.error()["message"].to_string();
    for host in ["web-1", "web-2"] {
        assert!(message.contains(host), "{host} not named: {message}");
    }
    assert_eq!(fleet.live_release("web-1").as_deref(), Some("v1"));
}
