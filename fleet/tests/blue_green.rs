//! Tests the fleet's blue-green modes on their own: roller's blue-green strategy is tested
//! against these slots, so the slots must behave as the design says (blue live at start, green
//! startable beside it on its own port, either slot stoppable, nothing left after `down`)
//! before any roller code runs against them.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use roller_fleet::{
    Fleet, FleetSpec, Mode, RESTART_SLOT, STOP_SLOT, SlotStatus, http, nginx, proc,
};

/// Starting a JVM on a loaded 2-core machine; `up` itself allows 120 s for a whole fleet.
const SLOT_START: Duration = Duration::from_secs(120);

#[test]
fn blue_green_fleet_runs_two_slots_per_host() {
    let mut fleet = Fleet::up(FleetSpec::for_test("blue_green", 2).with_mode(Mode::BlueGreen))
        .expect("fleet up");
    let hosts = fleet.host_names();
    assert_eq!(hosts, ["web-1", "web-2"]);
    assert_eq!(fleet.spec().mode, Mode::BlueGreen);
    assert_eq!(
        (fleet.slot_port("blue"), fleet.slot_port("green")),
        (8081, 8082)
    );

    // Blue serves v1, green was never deployed.
    let mut blue_pids = Vec::new();
    for host in &hosts {
        let dir = fleet.host_dir(host);
        assert_eq!(fleet.slot_release(host, "blue").as_deref(), Some("v1"));
        assert_eq!(fleet.slot_release(host, "green"), None, "{host}");
        assert!(!dir.join("shop/current-green").exists());
        assert!(!dir.join("shop/current").exists(), "no rolling link");
        assert_eq!(fleet.slot_version(host, "blue").as_deref(), Some("v1"));
        assert_eq!(fleet.slot_version(host, "green"), None);
        assert_eq!(fleet.slot_pid(host, "green"), None);
        let blue = fleet.slot_pid(host, "blue").expect("blue runs");
        assert_eq!(fleet.app_pid(host), Some(blue), "the app is the live slot");
        assert_eq!(fleet.live_release(host).as_deref(), Some("v1"));
        blue_pids.push(blue);
    }
    assert_eq!(fleet.live_slot().as_deref(), Some("blue"));
    let upstream = fleet.upstream_text();
    for host in &hosts {
        let address = fleet.host_address(host);
        assert!(
            upstream.contains(&format!("    server {address}:8081;\n")),
            "{upstream}"
        );
    }
    assert!(!upstream.contains(":8082"), "{upstream}");
    assert_eq!(versions_through_lb(&fleet, 20), ["v1"]);

    let status = fleet.status();
    assert!(status[0].slots.is_empty(), "the balancer has no slots");
    for row in &status[1..] {
        let [blue, green] = &row.slots[..] else {
            panic!("two slots: {row:#?}");
        };
        assert!(
            blue.live && blue.pid.is_some() && blue.health == Some(200),
            "{blue:#?}"
        );
        assert_eq!(blue.release.as_deref(), Some("v1"));
        assert_eq!(
            green,
            &SlotStatus {
                slot: "green".to_string(),
                port: 8082,
                live: false,
                pid: None,
                release: None,
                health: None
            }
        );
    }

    // Green can't start before anything was deployed to it, and blue is left alone.
    let refused = ssh(&fleet, "web-1", &format!("{RESTART_SLOT} green"));
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("current-green"),
        "{}",
        refused.stderr
    );
    let usage = ssh(&fleet, "web-1", &format!("{RESTART_SLOT} purple"));
    assert_eq!(usage.status.code(), Some(2), "{usage:?}");
    let usage = ssh(&fleet, "web-1", STOP_SLOT);
    assert_eq!(usage.status.code(), Some(2), "{usage:?}");
    let idle = ssh(&fleet, "web-1", &format!("{STOP_SLOT} green"));
    assert!(idle.status.success(), "stopping a stopped slot: {idle:?}");
    assert_eq!(fleet.slot_pid("web-1", "blue"), Some(blue_pids[0]));

    // v2 into green by hand, as roller's upload and switch would, then green started over the
    // real ssh client, which must get its channel back at once although the JVM keeps running.
    let v2 = fleet.jar(&roller_fleet::JarSpec::healthy("v2")).unwrap();
    let mut green_pids = Vec::new();
    for host in &hosts {
        let shop = fleet.host_dir(host).join("shop");
        std::fs::create_dir_all(shop.join("releases/v2")).unwrap();
        std::fs::copy(&v2, shop.join("releases/v2/app.jar")).unwrap();
        std::os::unix::fs::symlink("releases/v2", shop.join("current-green")).unwrap();
        let started = Instant::now();
        let out = ssh(&fleet, host, &format!("{RESTART_SLOT} green"));
        assert!(out.status.success(), "{out:?}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "ssh waited for the JVM"
        );
        assert_eq!(fleet.slot_release(host, "green").as_deref(), Some("v2"));
    }
    for host in &hosts {
        fleet
            .wait_slot_healthy(host, "green", SLOT_START)
            .expect("green healthy");
        assert_eq!(fleet.slot_version(host, "green").as_deref(), Some("v2"));
        assert_eq!(fleet.slot_version(host, "blue").as_deref(), Some("v1"));
        green_pids.push(fleet.slot_pid(host, "green").expect("green runs"));
    }
    assert_eq!(
        hosts
            .iter()
            .map(|h| fleet.slot_pid(h, "blue").unwrap())
            .collect::<Vec<_>>(),
        blue_pids,
        "blue kept running"
    );
    assert!(fleet.slot_log_path("web-1", "green").is_file());
    // Nginx still points at blue: green is idle until the switch.
    assert_eq!(fleet.live_slot().as_deref(), Some("blue"));
    assert_eq!(versions_through_lb(&fleet, 20), ["v1"]);

    // The switch roller makes: one upstream file naming every host's green port, one reload.
    switch_to(&fleet, 8082);
    assert_eq!(fleet.live_slot().as_deref(), Some("green"));
    for (i, host) in hosts.iter().enumerate() {
        assert_eq!(fleet.app_pid(host), Some(green_pids[i]));
        assert_eq!(fleet.live_release(host).as_deref(), Some("v2"));
    }
    assert!(fleet.status()[1].slots[1].live);

    // Blue stops on web-1 (twice: the second time it is not running); web-2 keeps its old
    // blue for a switch-back, so `down` has both slots to stop there.
    let out = ssh(&fleet, "web-1", &format!("{STOP_SLOT} blue"));
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("stopped blue"), "{}", out.stdout);
    assert!(!proc::alive(blue_pids[0]), "blue survived stop-slot");
    assert_eq!(fleet.slot_pid("web-1", "blue"), None);
    assert_eq!(fleet.slot_version("web-1", "blue"), None);
    let again = ssh(&fleet, "web-1", &format!("{STOP_SLOT} blue"));
    assert!(again.status.success(), "{again:?}");
    assert!(again.stdout.contains("not running"), "{}", again.stdout);
    assert_eq!(fleet.slot_pid("web-1", "green"), Some(green_pids[0]));
    assert_eq!(fleet.slot_pid("web-2", "blue"), Some(blue_pids[1]));
    assert_eq!(versions_through_lb(&fleet, 20), ["v2"]);

    let mut pids = vec![blue_pids[1]];
    pids.extend(&green_pids);
    for host in hosts.iter().map(String::as_str).chain(["lb"]) {
        pids.push(fleet.sshd_pid(host));
    }
    let nginx = fleet.nginx_pid().expect("nginx master");
    pids.push(nginx);
    pids.extend(proc::children(nginx));
    fleet.down();
    for pid in pids {
        assert!(!proc::alive(pid), "pid {pid} survived down");
    }
}

#[test]
fn single_machine_blue_green_serves_v1_from_the_lb_host() {
    let mut fleet =
        Fleet::up(FleetSpec::for_test("blue_green_single", 1).with_mode(Mode::BlueGreenSingle))
            .expect("fleet up");
    assert_eq!(fleet.host_names(), ["app"]);
    assert_eq!(fleet.host_address("app"), fleet.lb_address());
    assert_eq!(fleet.host_dir("app"), fleet.host_dir("lb"));
    assert_eq!(
        fleet.sshd_pid("app"),
        fleet.sshd_pid("lb"),
        "one machine, one sshd"
    );
    let lb_dir = fleet.host_dir("lb");
    for path in [
        "bin/restart-slot",
        "bin/stop-slot",
        "shop/current-blue",
        "nginx/nginx.conf",
    ] {
        assert!(lb_dir.join(path).exists(), "{path} in the LB's directory");
    }

    assert_eq!(fleet.live_slot().as_deref(), Some("blue"));
    assert_eq!(
        fleet
            .upstream_text()
            .lines()
            .filter(|l| l.contains("server "))
            .collect::<Vec<_>>(),
        [format!("    server {}:8081;", fleet.lb_address())]
    );
    assert_eq!(fleet.slot_version("app", "blue").as_deref(), Some("v1"));
    assert_eq!(fleet.slot_pid("app", "green"), None);
    assert_eq!(versions_through_lb(&fleet, 10), ["v1"]);
    // Over the LB's own sshd, where roller will run the slot commands.
    let idle = ssh(&fleet, "app", &format!("{STOP_SLOT} green"));
    assert!(idle.status.success(), "{idle:?}");

    let inventory: toml::Table = std::fs::read_to_string(fleet.inventory_path())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(inventory["strategy"].as_str(), Some("blue-green"));
    let hosts = inventory["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0]["name"].as_str(), Some("app"));
    assert_eq!(
        hosts[0]["address"].as_str(),
        Some(fleet.lb_address().as_str())
    );
    assert_eq!(
        inventory["balancer"]["hosts"].as_array().unwrap(),
        &[toml::Value::from(fleet.lb_address())]
    );

    let status = fleet.status();
    assert_eq!(status.len(), 2, "{status:#?}");
    assert!(
        status.iter().all(|s| s.sshd_alive && s.health == Some(200)),
        "{status:#?}"
    );

    let blue = fleet.slot_pid("app", "blue").unwrap();
    let nginx = fleet.nginx_pid().unwrap();
    let mut pids = vec![blue, fleet.sshd_pid("lb"), nginx];
    pids.extend(proc::children(nginx));
    fleet.down();
    for pid in pids {
        assert!(!proc::alive(pid), "pid {pid} survived down");
    }
}

/// What a remote command left: roller runs the slot scripts the same way.
#[derive(Debug)]
struct Output {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `command` on `host` with the real OpenSSH client and strict host-key checking.
fn ssh(fleet: &Fleet, host: &str, command: &str) -> Output {
    let finished = proc::run(
        Command::new("ssh")
            .arg("-i")
            .arg(fleet.identity_path())
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                fleet.known_hosts_path().display()
            ))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
            .args(["-o", "ConnectTimeout=10", "-p"])
            .arg(fleet.spec().ssh_port.to_string())
            .arg(format!("{}@{}", fleet.user(), fleet.host_address(host)))
            .arg(command),
        // stop-slot may wait up to 35 s for a JVM that ignores SIGTERM.
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("ssh {host} {command}: {e:#}"));
    Output {
        status: finished.status,
        stdout: finished.stdout,
        stderr: finished.stderr,
    }
}

/// The distinct versions that answer `n` requests through nginx, all of which must succeed.
fn versions_through_lb(fleet: &Fleet, n: usize) -> Vec<String> {
    let (authority, _) = http::split_url(&fleet.lb_url()).unwrap();
    let mut versions: Vec<String> = (0..n)
        .map(|_| {
            let response = http::get(&authority, "/version", Duration::from_secs(10)).unwrap();
            assert_eq!(response.status, 200, "{}", response.text());
            response.text().trim().to_string()
        })
        .collect();
    versions.sort();
    versions.dedup();
    versions
}

/// Points the upstream at `port` on every host and reloads nginx with the inventory's own
/// reload command, then waits until nginx serves only from the new port.
fn switch_to(fleet: &Fleet, port: u16) {
    let servers: Vec<String> = fleet
        .host_names()
        .iter()
        .map(|h| format!("{}:{port}", fleet.host_address(h)))
        .collect();
    write_atomically(
        &fleet.upstream_file(),
        &nginx::upstream_text(nginx::UPSTREAM, &servers),
    );
    let inventory: toml::Table = std::fs::read_to_string(fleet.inventory_path())
        .unwrap()
        .parse()
        .unwrap();
    let reload = inventory["balancer"]["reload"].as_str().unwrap();
    proc::run(
        Command::new("/bin/sh").arg("-c").arg(reload),
        Duration::from_secs(30),
    )
    .unwrap()
    .check("nginx reload")
    .unwrap();
    // Old workers finish their keep-alive connections on the old upstream for a moment.
    let want = format!(":{port} 200 ");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (authority, _) = http::split_url(&fleet.lb_url()).unwrap();
        let served = http::get(&authority, "/version", Duration::from_secs(10)).unwrap();
        assert_eq!(served.status, 200);
        let log = std::fs::read_to_string(fleet.access_log_path()).unwrap_or_default();
        if log.lines().last().is_some_and(|l| l.contains(&want)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nginx never used port {port}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_atomically(path: &Path, text: &str) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).unwrap();
    std::fs::rename(&partial, path).unwrap();
}
