//! The floor roller is measured against: the same rolling rollout done by a plain bash script
//! over OpenSSH with ControlMaster (one multiplexed connection per host), doing only the
//! steps that must happen: connect, upload and verify the jar on every host, then per batch
//! the pool change with a reload that waits out the old workers, the drain, the link switch,
//! the restart, a health poll every 20 ms, and the pool change back. No lock, no state, no
//! pre-flight, no capacity check: whatever roller spends beyond this is its own.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use roller_fleet::{Fleet, proc};

/// How long one floor rollout may take before the bench gives up on it.
const FLOOR_DEADLINE: Duration = Duration::from_secs(600);

/// One batch of a rollout: its wall time, and the longest restart and restart-to-healthy of
/// its hosts, which belong to the app rather than to whoever drives the rollout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchTimes {
    pub wall_ms: u64,
    pub restart_ms: u64,
    pub health_ms: u64,
}

impl BatchTimes {
    /// What the driver spent on the batch beyond the app's restart and start-up.
    pub fn own_ms(&self) -> u64 {
        self.wall_ms
            .saturating_sub(self.restart_ms + self.health_ms)
    }
}

pub(crate) struct FloorRun {
    pub wall: Duration,
    pub batches: Vec<BatchTimes>,
}

/// Rolls `jar` out as `release` across `fleet` in batches of `batch` hosts, with the floor
/// script. The fleet's upstream file must be one roller wrote (full pool): the script writes
/// the same text, with the batch marked `down`, so roller reads the pool as its own afterwards.
pub(crate) fn rollout(
    fleet: &Fleet,
    jar: &Path,
    release: &str,
    batch: usize,
    work: &Path,
) -> anyhow::Result<FloorRun> {
    let dir = work.join(format!("floor-{release}"));
    std::fs::create_dir_all(dir.join("cm"))?;
    let script = script(fleet, jar, release, batch, &dir)?;
    let path = dir.join("rollout.sh");
    std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    let started = Instant::now();
    let run = proc::run(Command::new("bash").arg(&path), FLOOR_DEADLINE)?;
    let wall = started.elapsed();
    // The masters persist; close them so no ssh process outlives the bench.
    let _ = proc::run(
        Command::new("bash").arg(dir.join("close.sh")),
        Duration::from_secs(30),
    );
    if !run.status.success() {
        bail!(
            "the floor script failed ({}):\n{}\n{}",
            run.status,
            run.stdout.trim(),
            run.stderr.trim()
        );
    }
    let batches = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("batch "))
        .map(|l| {
            let n: Vec<u64> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            match n[..] {
                [_, wall_ms, restart_ms, health_ms] => Ok(BatchTimes {
                    wall_ms,
                    restart_ms,
                    health_ms,
                }),
                _ => bail!("unexpected floor line: batch {l}"),
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(FloorRun { wall, batches })
}

/// One `sh` word.
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn script(
    fleet: &Fleet,
    jar: &Path,
    release: &str,
    batch: usize,
    dir: &Path,
) -> anyhow::Result<String> {
    let nginx = fleet.lb_nginx();
    let spec = fleet.spec();
    let full = fleet.upstream_text();
    let hosts = fleet.host_names();
    if hosts.is_empty() || batch == 0 {
        bail!("nothing to roll out");
    }
    let sha = sha256_hex(jar)?;
    let target = |user: &str, address: &str| format!("{user}@{address}");
    let lb = target(fleet.user(), &fleet.lb_address());

    let mut s = String::new();
    s.push_str("#!/bin/bash\nset -euo pipefail\n");
    s.push_str(&format!("cm={}\n", q(&dir.join("cm").to_string_lossy())));
    s.push_str(&format!(
        "opts=(-o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={kh} \
         -o IdentitiesOnly=yes -i {id} -p {port} -o ControlMaster=auto -o \"ControlPath=$cm/%C\" \
         -o ControlPersist=600 -o LogLevel=ERROR)\n",
        kh = q(&fleet.known_hosts_path().to_string_lossy()),
        id = q(&fleet.identity_path().to_string_lossy()),
        port = spec.ssh_port,
    ));
    s.push_str("on() { local t=$1; shift; ssh \"${opts[@]}\" \"$t\" \"$@\"; }\n");
    s.push_str("now() { date +%s%3N; }\n");
    s.push_str("waitall() { local p; for p in \"$@\"; do wait \"$p\"; done; }\n");
    // Health from the controller, straight to the app: cheaper than any SSH channel.
    s.push_str(&format!(
        "deploy() {{\n  local t=$1 a=$2 out=$3 s r h\n  on \"$t\" {switch}\n  s=$(now); on \"$t\" {restart} >/dev/null; r=$(now)\n  \
         until curl -fsS -o /dev/null --max-time 2 \"http://$a:{port}{path}\"; do sleep 0.02; done\n  \
         h=$(now); echo \"$((r - s)) $((h - r))\" > \"$out\"\n}}\n",
        switch = q(&format!(
            "cd {app} && mkdir -p .roller && ln -sfn releases/{release} .roller/current.new && mv -T .roller/current.new current",
            app = roller_fleet::APP_DIR
        )),
        restart = q(roller_fleet::RESTART),
        port = spec.app_port,
        path = roller_fleet::HEALTH_PATH,
    ));
    // A pool change: the new upstream file, a reload, and the wait until no worker of the old
    // generation is left, as roller waits (read from the master's children before the reload).
    let upstream = nginx.upstream_file().to_string_lossy().into_owned();
    let pool = q(&format!(
        "cat > {up}.new && mv -f {up}.new {up} && m=$(cat {pid}) && old=$(pgrep -P \"$m\" | tr '\\n' ' ') && {reload} && \
         while :; do a=; for p in $old; do [ -e /proc/$p ] && a=1; done; [ -z \"$a\" ] && break; sleep 0.02; done",
        up = q(&upstream),
        pid = q(&nginx.pid_file().to_string_lossy()),
        reload = nginx.reload_command(),
    ));

    s.push_str("start=$(now)\n# One master connection per host, opened at once.\npids=()\n");
    s.push_str(&format!("on {} true & pids+=($!)\n", q(&lb)));
    for host in &hosts {
        let t = target(&fleet.host_user(host), &fleet.host_address(host));
        s.push_str(&format!("on {} true & pids+=($!)\n", q(&t)));
    }
    s.push_str("waitall \"${pids[@]}\"\n# Upload and verify on every host, before any pool change.\npids=()\n");
    let upload = q(&format!(
        "r={app}/releases/{release}; mkdir -p \"$r\" && cat > \"$r\"/.app.jar.part && \
         [ \"$(sha256sum < \"$r\"/.app.jar.part | cut -d' ' -f1)\" = {sha} ] && mv -f \"$r\"/.app.jar.part \"$r\"/{jar}",
        app = roller_fleet::APP_DIR,
        jar = roller_fleet::JAR_NAME,
    ));
    for host in &hosts {
        let t = target(&fleet.host_user(host), &fleet.host_address(host));
        s.push_str(&format!(
            "on {} {upload} < {} & pids+=($!)\n",
            q(&t),
            q(&jar.to_string_lossy())
        ));
    }
    s.push_str("waitall \"${pids[@]}\"\n");
    std::fs::write(dir.join("full.conf"), &full)?;
    for (n, members) in hosts.chunks(batch).enumerate() {
        let n = n + 1;
        let out = dir.join(format!("out-{n}.conf"));
        std::fs::write(&out, mark_down(&full, members))?;
        let sockets: Vec<String> = members
            .iter()
            .map(|h| format!("dst {}:{}", fleet.host_address(h), spec.app_port))
            .collect();
        let drain = q(&format!(
            "while ss -Htn state established '( {} )' | grep -q .; do sleep 0.02; done",
            sockets.join(" or ")
        ));
        s.push_str(&format!("\n# batch {n}\nt=$(now)\n"));
        s.push_str(&format!(
            "on {} {pool} < {}\n",
            q(&lb),
            q(&out.to_string_lossy())
        ));
        s.push_str(&format!("on {} {drain}\npids=()\n", q(&lb)));
        for (i, host) in members.iter().enumerate() {
            let t = target(&fleet.host_user(host), &fleet.host_address(host));
            s.push_str(&format!(
                "deploy {} {} {} & pids+=($!)\n",
                q(&t),
                q(&fleet.host_address(host)),
                q(&dir.join(format!("host-{n}-{i}")).to_string_lossy())
            ));
        }
        s.push_str("waitall \"${pids[@]}\"\n");
        s.push_str(&format!(
            "on {} {pool} < {}\n",
            q(&lb),
            q(&dir.join("full.conf").to_string_lossy())
        ));
        s.push_str(&format!(
            "rm=0; hm=0; for f in {}/host-{n}-*; do read -r a b < \"$f\"; [ \"$a\" -gt \"$rm\" ] && rm=$a; [ \"$b\" -gt \"$hm\" ] && hm=$b; done\n\
             echo \"batch {n} $(( $(now) - t )) $rm $hm\"\n",
            q(&dir.to_string_lossy())
        ));
    }
    s.push_str("echo \"total $(( $(now) - start ))\"\n");

    let mut close = String::from("#!/bin/bash\n");
    for t in std::iter::once(lb.clone()).chain(
        hosts
            .iter()
            .map(|h| target(&fleet.host_user(h), &fleet.host_address(h))),
    ) {
        close.push_str(&format!(
            "ssh -o ControlPath={}/%C -O exit {} 2>/dev/null\n",
            q(&dir.join("cm").to_string_lossy()),
            q(&t)
        ));
    }
    std::fs::write(dir.join("close.sh"), close)?;
    Ok(s)
}

/// `full` with the servers of `hosts` marked `down`, as roller writes a batch out of the pool
/// (each server line ends with `# <host name>`).
fn mark_down(full: &str, hosts: &[String]) -> String {
    full.lines()
        .map(|line| {
            let name = line.rsplit_once("# ").map(|(_, n)| n.trim());
            match name {
                Some(n)
                    if hosts.iter().any(|h| h == n) && line.trim_start().starts_with("server ") =>
                {
                    line.replacen(';', " down;", 1)
                }
                _ => line.to_string(),
            }
        })
        .map(|l| l + "\n")
        .collect()
}

fn sha256_hex(file: &Path) -> anyhow::Result<String> {
    let out = proc::run(Command::new("sha256sum").arg(file), Duration::from_secs(60))?;
    out.stdout
        .split_whitespace()
        .next()
        .map(str::to_string)
        .context("sha256sum printed nothing")
}
