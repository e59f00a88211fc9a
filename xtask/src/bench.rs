//! `cargo xtask bench`: how fast roller itself is on a local fleet, and how fast the SSH
//! transport uploads, measured on a quiet machine and reported rather than asserted.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use roller_fleet::{Fleet, FleetSpec, JarSpec, proc};

use crate::{BENCH_NET, CI_STEP_TIMEOUT, cargo, workspace_root};

pub(crate) fn bench(
    hosts: usize,
    root: Option<PathBuf>,
    roller: Option<PathBuf>,
) -> anyhow::Result<bool> {
    let root = root.unwrap_or_else(|| roller_fleet::target_dir().join("fleet-bench"));
    let roller = match roller {
        Some(path) => path,
        None => build_roller()?,
    };
    // Lean logins everywhere, the LB's included: the hosts' shell start-up is not roller's time.
    let mut fleet =
        Fleet::up(FleetSpec::new(&root, hosts, BENCH_NET).with_lean_logins_everywhere())?;
    let v2 = fleet.jar(&JarSpec::healthy("v2"))?;
    let out = Command::new(&roller)
        .arg("rollout")
        .arg("--inventory")
        .arg(fleet.inventory_path())
        .arg("--artifact")
        .arg(&v2)
        .args(["--release", "v2", "--batch", "1", "--output", "json"])
        .arg("--journal-dir")
        .arg(roller_fleet::target_dir().join("fleet-bench-journal"))
        .output()
        .context("running roller")?;
    fleet.down();
    let events_file = roller_fleet::target_dir().join("fleet-bench-events.jsonl");
    std::fs::write(&events_file, &out.stdout)
        .with_context(|| format!("writing {}", events_file.display()))?;
    if !out.status.success() {
        bail!(
            "the rollout failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| e["event"] == "step")
        .map(|e| e["step"].clone())
        .collect();
    let mut overheads = Vec::new();
    println!("\nbatch  wall ms  restart ms  health ms  roller ms");
    for batch in 1..=hosts as u64 {
        let of_batch: Vec<&serde_json::Value> =
            events.iter().filter(|e| e["batch"] == batch).collect();
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
        let (Some(first), Some(last)) = (first, last) else {
            continue;
        };
        let (restart, health) = (longest("restart"), longest("health-check"));
        let overhead = (last - first).saturating_sub(restart + health);
        overheads.push(overhead);
        println!(
            "{batch:>5}  {:>7}  {restart:>10}  {health:>9}  {overhead:>9}",
            last - first
        );
    }
    if overheads.is_empty() {
        bail!("no batch events in roller's output");
    }
    let mean = overheads.iter().sum::<u64>() / overheads.len() as u64;
    // The switch step is one rename: its time is what any remote command costs on these
    // hosts, the deploy user's login shell starting included.
    let command_ms = events
        .iter()
        .filter(|e| e["phase"] == "switch")
        .filter_map(|e| e["elapsed_ms"].as_u64())
        .min()
        .unwrap_or(0);
    // Every reload starts a generation of nginx workers that roller waits out, and closes
    // the clients' idle keep-alive connections: fewer is better, B + 1 for B batches at best.
    let reloads = events
        .iter()
        .filter(|e| e["state"] == "succeeded" && e["down"].is_array())
        .count();
    println!("\nroller's own time per batch: {mean} ms on average (target: < 400 ms)");
    println!(
        "nginx reloads in the rollout: {reloads} for {} batches (one per batch boundary: {})",
        overheads.len(),
        overheads.len() + 1
    );
    println!(
        "one remote command costs {command_ms} ms on these hosts (a rename, login shell included); a batch runs 6 besides the restart"
    );
    println!("{}", upload_speed());
    Ok(mean < 400)
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

fn build_roller() -> anyhow::Result<PathBuf> {
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
