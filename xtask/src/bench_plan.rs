//! `cargo xtask bench plan`: what `roller plan` costs on a large inventory, offline. A plan must
//! grow with hosts plus batches; at batch 1 a plan that grew with their product took 250 MB and
//! seconds for 1,000 hosts. Measured on the release binary and reported against the targets,
//! not asserted in tests (the machine is shared).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::workspace_root;

/// Runs of each command; the table shows the median time and the largest memory.
const RUNS: usize = 5;

const TIME_TARGET: Duration = Duration::from_millis(100);
const MEMORY_TARGET_KB: u64 = 50 * 1024;
const OUTPUT_TARGET: u64 = 10 * 1000 * 1000;

struct Measured {
    wall: Duration,
    /// User plus system time: what the run cost, whatever else the cores were doing.
    cpu: Duration,
    max_rss_kb: u64,
    bytes: u64,
}

pub(crate) fn bench_plan(
    hosts: usize,
    batch: &str,
    roller: Option<PathBuf>,
) -> anyhow::Result<bool> {
    let roller = match roller {
        Some(path) => path,
        None => crate::bench::build_roller()?,
    };
    let dir = roller_fleet::target_dir().join("bench-plan");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let inventory = dir.join(format!("inventory-{hosts}.toml"));
    std::fs::write(&inventory, inventory_of(hosts)?)
        .with_context(|| format!("writing {}", inventory.display()))?;
    println!(
        "roller plan of {hosts} hosts at --batch {batch} ({}), {RUNS} runs each: median wall time, largest peak RSS\n",
        inventory.display()
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average before: {} ({} cores)\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| command | wall time (target < {} ms) | CPU time | peak RSS (target < {} MB) | output (target < {} MB) |",
        TIME_TARGET.as_millis(),
        MEMORY_TARGET_KB / 1024,
        OUTPUT_TARGET / 1_000_000
    );
    println!("|---|---|---|---|---|");
    let mut all_met = true;
    for (name, extra) in [
        ("roller plan", &[][..]),
        ("roller plan --output json", &["--output", "json"][..]),
        ("roller plan --commands", &["--commands"][..]),
    ] {
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            runs.push(measure(&roller, &inventory, batch, extra)?);
        }
        runs.sort_by_key(|m| m.wall);
        let wall = runs[RUNS / 2].wall;
        let mut cpu: Vec<Duration> = runs.iter().map(|m| m.cpu).collect();
        cpu.sort();
        let cpu = cpu[RUNS / 2];
        let rss = runs.iter().map(|m| m.max_rss_kb).max().unwrap_or(0);
        let bytes = runs[0].bytes;
        // --commands prints every command and every upstream file: it is the full listing a
        // person asks for, and it has no target.
        let targeted = extra != ["--commands"];
        let met = wall < TIME_TARGET && rss < MEMORY_TARGET_KB && bytes < OUTPUT_TARGET;
        if targeted {
            all_met &= met;
        }
        println!(
            "| `{name}`{} | {} ms | {} ms | {:.1} MB | {} |",
            if targeted { "" } else { " (no target)" },
            wall.as_millis(),
            cpu.as_millis(),
            rss as f64 / 1024.0,
            size(bytes),
        );
    }
    Ok(all_met)
}

/// The example inventory's settings with `hosts` hosts.
fn inventory_of(hosts: usize) -> anyhow::Result<String> {
    let example = workspace_root().join("inventory.example.toml");
    let text = std::fs::read_to_string(&example)
        .with_context(|| format!("reading {}", example.display()))?;
    let mut inventory = text
        .split("[[hosts]]")
        .next()
        .context("the example inventory has no settings")?
        .to_string();
    for i in 0..hosts {
        inventory.push_str(&format!(
            "[[hosts]]\nname = \"web-{}\"\naddress = \"10.{}.{}.10\"\n\n",
            i + 1,
            i / 250,
            i % 250
        ));
    }
    Ok(inventory)
}

/// One run: wall time from spawn to exit, the child's own peak RSS (`wait4`, so runs do not
/// mix), and the bytes it printed, counted as they come and not kept. Not `measure::run`,
/// which keeps the output: the child of a parent holding hundreds of megabytes (`--commands`)
/// starts with those pages resident until it execs, and they count in its peak.
fn measure(
    roller: &Path,
    inventory: &Path,
    batch: &str,
    extra: &[&str],
) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let mut child = Command::new(roller)
        .arg("plan")
        .arg("--inventory")
        .arg(inventory)
        .args(["--release", "v2", "--batch", batch])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", roller.display()))?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let mut bytes = 0u64;
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        match stdout.read(&mut buffer)? {
            0 => break,
            n => bytes += n as u64,
        }
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet waited for; status and usage are valid pointers.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = started.elapsed();
    if waited != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("roller plan failed ({status}): {stderr}");
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok(Measured {
        wall,
        cpu: time(usage.ru_utime) + time(usage.ru_stime),
        // Linux reports ru_maxrss in kilobytes.
        max_rss_kb: usage.ru_maxrss as u64,
        bytes,
    })
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}
