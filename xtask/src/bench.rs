//! `cargo xtask bench`: how fast roller is on a local fleet next to the floor (the same
//! rollout as a plain OpenSSH ControlMaster script, in turn on the same fleet), and how fast
//! the SSH transport uploads; measured and reported rather than asserted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use roller_fleet::{Fleet, FleetSpec, JarSpec, proc};

use crate::floor::{self, BatchTimes};
use crate::scale;
use crate::{BENCH_NET, CI_STEP_TIMEOUT, cargo, workspace_root};

/// From this many hosts on, the bench measures scale (light apps, no floor) instead.
const SCALE_HOSTS: usize = 50;

pub(crate) fn bench(
    hosts: usize,
    root: Option<PathBuf>,
    roller: Option<PathBuf>,
    batches: Option<Vec<String>>,
    rounds: usize,
) -> anyhow::Result<bool> {
    let root = root.unwrap_or_else(|| roller_fleet::target_dir().join("fleet-bench"));
    let roller = match roller {
        Some(path) => path,
        None => build_roller()?,
    };
    let scale = hosts >= SCALE_HOSTS;
    let batches = batches.unwrap_or_else(|| {
        let default: &[&str] = if scale { &["10%"] } else { &["1", "2"] };
        default.iter().map(|b| b.to_string()).collect()
    });
    // Lean logins everywhere, the LB's included: the hosts' shell start-up is not roller's time.
    let mut spec = FleetSpec::new(&root, hosts, BENCH_NET).with_lean_logins_everywhere();
    if scale {
        spec = spec.with_light_apps();
    }
    let mut fleet = Fleet::up(spec)?;
    let result = (|| {
        // Two jars taking turns, so that every rollout brings a new release.
        let jars = [
            fleet.jar(&JarSpec::healthy("v2"))?,
            fleet.jar(&JarSpec::healthy("v3"))?,
        ];
        let work = roller_fleet::target_dir().join("fleet-bench-work");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        if scale {
            scale::bench(&fleet, &roller, (&jars, &work), &batches)
        } else {
            alternate(&fleet, &roller, (&jars, &work), &batches, rounds.max(1))
        }
    })();
    fleet.down();
    let met = result?;
    if !scale {
        println!("\n{}", upload_speed());
    }
    Ok(met)
}

/// Hosts per batch for `batch` ("2" or "25%"), as roller counts them: a share rounds up.
pub(crate) fn batch_hosts(batch: &str, hosts: usize) -> anyhow::Result<usize> {
    let n = match batch.strip_suffix('%') {
        Some(percent) => {
            let p: usize = percent.parse().context("a batch share like 10%")?;
            (hosts * p).div_ceil(100)
        }
        None => batch.parse().context("a batch size like 2 or 10%")?,
    };
    if n == 0 {
        bail!("a batch of {batch} takes no host");
    }
    Ok(n)
}

/// Roller and the floor script in turn on one fleet, `rounds` times per batch size, each
/// rollout a new release (two jars taking turns), so both meet the same machine load.
fn alternate(
    fleet: &Fleet,
    roller: &Path,
    (jars, work): (&[PathBuf; 2], &Path),
    batches: &[String],
    rounds: usize,
) -> anyhow::Result<bool> {
    let mut n = 0;
    let mut met = true;
    for batch in batches {
        let size = batch_hosts(batch, fleet.host_names().len())?;
        println!(
            "\n{} hosts, batch {batch}: roller and the OpenSSH ControlMaster floor in turn",
            fleet.host_names().len()
        );
        println!(
            "round  roller s  floor s  roller/floor  roller own ms/batch  floor own ms/batch  reloads"
        );
        let (mut ratios, mut owns) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            n += 1;
            let ours = roller_rollout(roller, fleet, &jars[n % 2], &format!("r{n}"), batch, work)?;
            n += 1;
            let floor = floor::rollout(fleet, &jars[n % 2], &format!("f{n}"), size, work)?;
            let ratio = ours.wall.as_secs_f64() / floor.wall.as_secs_f64();
            let own = mean_own(&ours.batches);
            ratios.push(ratio);
            owns.push(own);
            println!(
                "{round:>5}  {:>8.2}  {:>7.2}  {ratio:>12.2}  {own:>19}  {:>18}  {:>7}",
                ours.wall.as_secs_f64(),
                floor.wall.as_secs_f64(),
                mean_own(&floor.batches),
                ours.reloads
            );
        }
        let (ratio, own) = (
            median(&mut ratios),
            median(&mut owns.iter().map(|&o| o as f64).collect::<Vec<_>>()),
        );
        let ok = ratio <= 0.9 && own < 150.0;
        met &= ok;
        println!(
            "median: roller/floor {ratio:.2} (target <= 0.90), roller's own time per batch {own:.0} ms (target < 150 ms): {}",
            if ok { "met" } else { "MISSED" }
        );
    }
    Ok(met)
}

fn mean_own(batches: &[BatchTimes]) -> u64 {
    if batches.is_empty() {
        return 0;
    }
    batches.iter().map(BatchTimes::own_ms).sum::<u64>() / batches.len() as u64
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

struct RollerRun {
    wall: Duration,
    batches: Vec<BatchTimes>,
    reloads: usize,
}

fn roller_rollout(
    roller: &Path,
    fleet: &Fleet,
    jar: &Path,
    release: &str,
    batch: &str,
    work: &Path,
) -> anyhow::Result<RollerRun> {
    let started = Instant::now();
    let out = proc::run(
        Command::new(roller)
            .arg("rollout")
            .arg("--inventory")
            .arg(fleet.inventory_path())
            .arg("--artifact")
            .arg(jar)
            .args(["--release", release, "--batch", batch, "--output", "json"])
            .arg("--journal-dir")
            .arg(work.join("journal")),
        CI_STEP_TIMEOUT,
    )?;
    let wall = started.elapsed();
    let events_file = work.join(format!("{release}.events.jsonl"));
    std::fs::write(&events_file, &out.stdout)
        .with_context(|| format!("writing {}", events_file.display()))?;
    if !out.status.success() {
        bail!("the rollout failed ({}): {}", out.status, out.stderr);
    }
    let events: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| e["event"] == "step")
        .map(|e| e["step"].clone())
        .collect();
    let mut batches = Vec::new();
    for number in 1.. {
        let of_batch: Vec<&serde_json::Value> =
            events.iter().filter(|e| e["batch"] == number).collect();
        if of_batch.is_empty() {
            break;
        }
        let first = of_batch
            .iter()
            .filter(|e| e["state"] == "started")
            .filter_map(|e| e["at_ms"].as_u64())
            .min();
        let last = of_batch.iter().filter_map(|e| e["at_ms"].as_u64()).max();
        let longest = |phase: &str| {
            of_batch
                .iter()
                .filter(|e| e["phase"] == phase)
                .filter_map(|e| e["elapsed_ms"].as_u64())
                .max()
                .unwrap_or(0)
        };
        if let (Some(first), Some(last)) = (first, last) {
            batches.push(BatchTimes {
                wall_ms: last - first,
                restart_ms: longest("restart"),
                health_ms: longest("health-check"),
            });
        }
    }
    if batches.is_empty() {
        bail!(
            "no batch events in roller's output ({})",
            events_file.display()
        );
    }
    // Every reload starts a generation of nginx workers that roller waits out, and closes
    // the clients' idle keep-alive connections: B + 1 for B batches at best.
    let reloads = events
        .iter()
        .filter(|e| e["state"] == "succeeded" && e["down"].is_array())
        .count();
    Ok(RollerRun {
        wall,
        batches,
        reloads,
    })
}

/// The upload speed that the SSH transport test for a 100 MiB jar prints, run on its own so
/// that no other test shares the cores with it. Reported whatever it is: a slow machine is not
/// a failed bench.
fn upload_speed() -> String {
    const TEST: &str = "a_100_mb_jar_uploads_whole";
    let run = proc::run(
        Command::new(cargo())
            .args([
                "test",
                "--quiet",
                "--test",
                "ssh_transport",
                "--",
                "--exact",
            ])
            .args([TEST, "--nocapture"])
            .current_dir(workspace_root()),
        CI_STEP_TIMEOUT,
    );
    match run {
        Ok(run) if run.status.success() => run
            .stderr
            .lines()
            .chain(run.stdout.lines())
            .find(|l| l.starts_with("uploaded 100 MiB"))
            .map_or_else(
                || format!("upload speed: {TEST} printed no figure"),
                |line| format!("SSH transport: {line}"),
            ),
        Ok(run) => format!(
            "upload speed: {TEST} failed ({}):\n{}",
            run.status,
            run.stdout.trim()
        ),
        Err(e) => format!("upload speed: could not run {TEST}: {e:#}"),
    }
}

pub(crate) fn build_roller() -> anyhow::Result<PathBuf> {
    println!("building roller (release)...");
    let built = proc::wait_child(
        &mut Command::new(cargo())
            .args(["build", "--quiet", "--release", "--bin", "roller"])
            .current_dir(workspace_root())
            .spawn()
            .context("running cargo build")?,
        CI_STEP_TIMEOUT,
    )?;
    if !built.success() {
        bail!("cargo build --release --bin roller failed ({built})");
    }
    Ok(workspace_root().join("target/release/roller"))
}
