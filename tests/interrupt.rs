//! Ctrl-C or SIGTERM before roller changed anything must stop it at once (exit 130), even while
//! it waits on a host that accepts TCP but never speaks SSH: there is nothing to finish, so
//! there is no reason to sit out `connect_timeout` and its retries.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A "host" whose TCP port accepts connections and then says nothing, as a machine whose sshd
/// is wedged does. Counts the connections it accepted.
fn silent_host(address: &str) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((address, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            // Kept open and unanswered; the test process's exit closes them.
            held.push(stream);
        }
    });
    (port, accepted)
}

fn start_rollout(dir: &std::path::Path, lb: (&str, u16), web: (&str, u16)) -> Child {
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    // A key of its own, so that roller gets as far as the hosts whatever agent the machine has.
    let identity = dir.join("id_ed25519");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&identity)
        .status()
        .expect("ssh-keygen");
    assert!(keygen.success());
    let jar = dir.join("shop-2.jar");
    std::fs::write(&jar, b"PK\x03\x04 not started on any host").unwrap();
    let inventory = dir.join("roller.toml");
    std::fs::write(
        &inventory,
        format!(
            r#"
[ssh]
user = "deploy"
identity = "{identity}"
known_hosts = "{known_hosts}"
connect_timeout = "120s"

[app]
name = "shop"
dir = "/opt/shop"
restart = "true"
port = 8080

[balancer]
hosts = ["lb"]
upstream_file = "/etc/nginx/conf.d/shop.conf"

[[hosts]]
name = "lb"
address = "{}"
port = {}

[[hosts]]
name = "web-1"
address = "{}"
port = {}
"#,
            lb.0,
            lb.1,
            web.0,
            web.1,
            known_hosts = known_hosts.display(),
            identity = identity.display(),
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_roller"))
        .arg("rollout")
        .arg("--inventory")
        .arg(&inventory)
        .arg("--artifact")
        .arg(&jar)
        .args(["--release", "v2", "--batch", "1"])
        .arg("--journal-dir")
        .arg(dir.join("journal"))
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start roller")
}

/// Kills roller if the test fails while it still runs, so no process outlives the test.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_for(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + bound;
    while !done() {
        assert!(Instant::now() < until, "{what}: not within {bound:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stopped_at_once_by(signal: i32, lb: &str, web: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (lb_port, lb_accepted) = silent_host(lb);
    let (web_port, web_accepted) = silent_host(web);
    let mut running = Running(start_rollout(dir.path(), (lb, lb_port), (web, web_port)));
    let roller = &mut running.0;
    // roller is inside pre-flight's connect, waiting on both silent hosts.
    wait_for(
        "roller connects to the silent hosts",
        Duration::from_secs(30),
        || lb_accepted.load(Ordering::SeqCst) >= 1 && web_accepted.load(Ordering::SeqCst) >= 1,
    );
    // SAFETY: kill(2) on the child this test started and has not reaped.
    unsafe { libc::kill(roller.id() as i32, signal) };

    // connect_timeout is 120 s: an exit well inside it can only be the signal's doing.
    let mut exited = None;
    wait_for(
        "roller exits after the signal",
        Duration::from_secs(60),
        || {
            exited = roller.try_wait().unwrap();
            exited.is_some()
        },
    );
    let mut stderr = String::new();
    roller
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(exited.unwrap().code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("before anything changed on any host"),
        "{stderr}"
    );
}

#[test]
fn ctrl_c_while_connecting_to_a_silent_host_exits_130_at_once() {
    stopped_at_once_by(libc::SIGINT, "127.0.95.1", "127.0.95.2");
}

#[test]
fn sigterm_while_connecting_to_a_silent_host_exits_130_at_once() {
    stopped_at_once_by(libc::SIGTERM, "127.0.95.3", "127.0.95.4");
}
