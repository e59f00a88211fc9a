//! The options that make the fleet play a cloud network (a bastion, hosts that admit only it,
//! hosts that refuse port forwarding), checked with OpenSSH's own client: such a fleet must
//! really refuse what production would refuse, or roller's support for it would be tested
//! against hosts that let everything in.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use roller_fleet::{BASTION_NAME, Bastion, Fleet, FleetSpec, Role};

/// `ssh` options for a strict, non-interactive login with the fleet's key and known_hosts.
fn strict(fleet: &Fleet) -> Vec<String> {
    [
        "-i",
        &fleet.identity_path().display().to_string(),
        "-o",
        &format!("UserKnownHostsFile={}", fleet.known_hosts_path().display()),
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        "-p",
        &fleet.spec().ssh_port.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Runs `pwd` on `host`, directly or hopping through the bastion as `ssh -J` does.
fn pwd_on(fleet: &Fleet, host: &str, through_bastion: bool) -> Output {
    let mut command = Command::new("ssh");
    command.args(strict(fleet));
    if through_bastion {
        let bastion = fleet.bastion().expect("the fleet has a bastion");
        // ProxyCommand rather than -J, which would not pass these options on to the hop.
        let hop = format!(
            "ssh {} -W %h:%p {}@{}",
            strict(fleet).join(" "),
            bastion.user,
            bastion.address
        );
        command.arg("-o").arg(format!("ProxyCommand={hop}"));
    }
    command
        .arg(format!(
            "{}@{}",
            fleet.host_user(host),
            fleet.host_address(host)
        ))
        .arg("pwd")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn sshd_log(fleet: &Fleet, host: &str) -> String {
    std::fs::read_to_string(fleet.host_dir(host).join("sshd/sshd.log")).unwrap_or_default()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

#[test]
fn bastion_only_hosts_refuse_direct_logins_and_take_the_bastion_s_forwards() {
    let fleet = Fleet::up(FleetSpec::for_test("bastion_only", 1).with_bastion(Bastion::Only))
        .expect("fleet up");
    let bastion = fleet.bastion().expect("a bastion endpoint");
    assert_eq!(bastion.address, fleet.spec().bastion_address());
    assert_eq!(bastion.address, fleet.host_address(BASTION_NAME));
    let status = fleet.status();
    let row = status.last().expect("status rows");
    assert_eq!((row.role, row.sshd_alive), (Role::Bastion, true), "{row:?}");
    let known_hosts = std::fs::read_to_string(fleet.known_hosts_path()).unwrap();
    assert!(
        known_hosts.lines().any(|l| l == bastion.known_hosts_line),
        "{known_hosts}"
    );

    for host in ["web-1", "lb"] {
        let direct = pwd_on(&fleet, host, false);
        assert!(
            !direct.status.success(),
            "{host} took a direct login: {}",
            text(&direct.stdout)
        );
        let log = sshd_log(&fleet, host);
        assert!(
            log.contains("from 127.0.0.1 not allowed because not listed in AllowUsers"),
            "{host}: {log}"
        );

        let hopped = pwd_on(&fleet, host, true);
        assert!(
            hopped.status.success(),
            "{host} through the bastion: {}",
            text(&hopped.stderr)
        );
        let dir = fleet.host_dir(host).canonicalize().unwrap();
        assert_eq!(Path::new(&text(&hopped.stdout)), dir);
        // The forward came from the bastion's own address, which is what let it in.
        let log = sshd_log(&fleet, host);
        assert!(
            log.contains(&format!("from {} port", bastion.address)) && log.contains("Accepted"),
            "{host}: {log}"
        );
    }
}

#[test]
fn the_bastion_keeps_openssh_s_default_connection_limits() {
    let fleet = Fleet::up(FleetSpec::for_test("bastion_limits", 1).with_bastion(Bastion::Open))
        .expect("fleet up");
    let config = fleet.host_dir(BASTION_NAME).join("sshd/sshd_config");
    let effective = Command::new(roller_fleet::sshd::SSHD_PATH)
        .arg("-T")
        .arg("-f")
        .arg(&config)
        .output()
        .unwrap();
    let effective = text(&effective.stdout).to_lowercase();
    assert!(
        effective.contains("\nmaxstartups 10:30:100\n"),
        "{effective}"
    );
    assert!(effective.contains("\nmaxsessions 10\n"), "{effective}");
    // Open: the hosts still take direct logins.
    let direct = pwd_on(&fleet, "web-1", false);
    assert!(direct.status.success(), "{}", text(&direct.stderr));
}

/// `ssh -W address:port` through `host`: a direct-tcpip channel, as roller's health checks
/// open, with nothing to send.
fn forward_through(fleet: &Fleet, host: &str, to: (&str, u16)) -> Output {
    Command::new("ssh")
        .args(strict(fleet))
        .arg("-W")
        .arg(format!("{}:{}", to.0, to.1))
        .arg(format!(
            "{}@{}",
            fleet.host_user(host),
            fleet.host_address(host)
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn hosts_that_refuse_forwarding_still_run_commands_while_the_bastion_forwards() {
    let fleet = Fleet::up(
        FleetSpec::for_test("refuse_forwarding", 1)
            .with_bastion(Bastion::Open)
            .with_forwarding_refused(),
    )
    .expect("fleet up");
    let app = (fleet.host_address("web-1"), fleet.spec().app_port);
    let app = (app.0.as_str(), app.1);

    for host in ["web-1", "lb"] {
        let refused = forward_through(&fleet, host, app);
        assert!(!refused.status.success(), "{host} forwarded");
        assert!(
            text(&refused.stderr).contains("administratively prohibited"),
            "{host}: {}",
            text(&refused.stderr)
        );
        let out = pwd_on(&fleet, host, false);
        assert!(out.status.success(), "{host}: {}", text(&out.stderr));
    }
    let forwarded = forward_through(&fleet, BASTION_NAME, app);
    assert!(
        forwarded.status.success(),
        "the bastion: {}",
        text(&forwarded.stderr)
    );
}
