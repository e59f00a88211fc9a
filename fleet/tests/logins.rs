//! Who the app hosts log in as, checked over SSH as roller would meet them: a deploy user with
//! passwordless sudo, one whose sudo asks for a password, and lean logins with no shell
//! initialisation of their own. A fleet that claims one of these must really behave so.
//!
//! Those users exist only when the fleet runs as root (as CI does); elsewhere these tests say
//! so and pass without a fleet.

use std::process::{Command, Output, Stdio};

use roller_fleet::users::{Login, SUDO_PASSWORD, is_root};
use roller_fleet::{Fleet, FleetSpec};

/// Runs `command` on `host` over SSH with the fleet's key and known_hosts.
fn run_on(fleet: &Fleet, host: &str, command: &str) -> Output {
    Command::new("ssh")
        .arg("-i")
        .arg(fleet.identity_path())
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            fleet.known_hosts_path().display()
        ))
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .arg("-p")
        .arg(fleet.spec().ssh_port.to_string())
        .arg(format!(
            "{}@{}",
            fleet.host_user(host),
            fleet.host_address(host)
        ))
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

fn fleet_logging_in_as(test: &str, login: Login) -> Option<Fleet> {
    if !is_root() {
        eprintln!("skipped: the fleet creates its users only when run as root");
        return None;
    }
    let spec = FleetSpec::for_test(test, 1).with_app_login(login);
    Some(Fleet::up(spec).expect("fleet up"))
}

#[test]
fn the_deploy_user_runs_the_hosts_commands_as_root_without_a_password() {
    let Some(fleet) = fleet_logging_in_as("sudo_nopasswd", Login::Sudo) else {
        return;
    };
    assert_eq!(fleet.host_user("web-1"), "roller-sudo");
    let me = run_on(&fleet, "web-1", "id -u");
    assert!(me.status.success(), "{}", text(&me.stderr));
    assert_ne!(text(&me.stdout), "0", "the deploy user is not root");

    let script = fleet.host_dir("web-1").canonicalize().unwrap();
    let script = script.join("bin/stop-slot");
    let out = run_on(
        &fleet,
        "web-1",
        &format!("sudo -n {} green && sudo -n id -u", script.display()),
    );
    // `id` is not among the allowed commands: the first sudo ran, the second was refused.
    assert!(!out.status.success(), "sudo ran id: {}", text(&out.stdout));
    assert_eq!(text(&out.stdout), "green was not running");
    assert!(
        text(&out.stderr).contains("password is required"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_sudo_that_asks_for_a_password_runs_nothing_without_it() {
    let Some(fleet) = fleet_logging_in_as("sudo_password", Login::SudoPassword) else {
        return;
    };
    assert_eq!(fleet.host_user("web-1"), "roller-sudo-pw");
    let out = run_on(&fleet, "web-1", "sudo -n true");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("password is required"),
        "{}",
        text(&out.stderr)
    );

    let out = run_on(
        &fleet,
        "web-1",
        &format!("echo {SUDO_PASSWORD} | sudo -S -p '' id -u"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "0");
}

#[test]
fn lean_logins_have_an_empty_home_but_one_host_keeps_its_heavy_bashrc() {
    if !is_root() {
        eprintln!("skipped: the fleet creates its users only when run as root");
        return;
    }
    let fleet =
        Fleet::up(FleetSpec::for_test("lean_logins", 3).with_lean_logins()).expect("fleet up");
    let users: Vec<String> = ["web-1", "web-2", "web-3"]
        .iter()
        .map(|h| fleet.host_user(h))
        .collect();
    assert_eq!(users, ["roller-bashrc", "roller-lean", "roller-lean"]);

    let listing = |host: &str| {
        let out = run_on(&fleet, host, "cd && pwd && ls -A");
        assert!(out.status.success(), "{host}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let lean = listing("web-2");
    assert_eq!(
        lean, "/var/lib/roller-fleet/home/roller-lean",
        "only the home itself"
    );
    let heavy = listing("web-1");
    assert!(heavy.lines().any(|l| l == ".bashrc"), "{heavy}");
}

#[test]
fn with_lean_logins_everywhere_the_load_balancer_is_root_without_rc_files() {
    if !is_root() {
        eprintln!("skipped: the fleet creates its users only when run as root");
        return;
    }
    let fleet = Fleet::up(FleetSpec::for_test("lean_lb", 1).with_lean_logins_everywhere())
        .expect("fleet up");
    assert_eq!(fleet.host_user("lb"), "roller-root");
    assert_eq!(fleet.host_user("web-1"), "roller-lean");
    let inventory = std::fs::read_to_string(fleet.inventory_path()).unwrap();
    assert!(
        inventory.contains("user = \"roller-root\""),
        "the inventory's ssh.user logs in on the LB: {inventory}"
    );
    // Still root, so it can rewrite nginx's files and signal its master; but its own home.
    let out = run_on(&fleet, "lb", "id -u && cd && pwd && ls -A");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "0\n/var/lib/roller-fleet/home/roller-root"
    );
}
