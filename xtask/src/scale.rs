//! `cargo xtask bench --hosts 100`: roller on a hundred hosts (light apps, an sshd each):
//! how long pre-flight takes, from roller's start to the last host checked, and roller's peak
//! memory over a whole rollout, against the targets (2 s, 50 MiB).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use roller_fleet::Fleet;

use crate::measure;

const PREFLIGHT_TARGET_MS: u64 = 2_000;
const MEMORY_TARGET_KB: u64 = 50 * 1024;
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(30 * 60);

pub(crate) fn bench(
    fleet: &Fleet,
    roller: &Path,
    (jars, work): (&[PathBuf; 2], &Path),
    batches: &[String],
) -> anyhow::Result<bool> {
    let hosts = fleet.host_names().len();
    let mut met = true;
    println!("\nhosts  batch  wall s  pre-flight ms  peak MiB");
    for (i, batch) in batches.iter().enumerate() {
        let release = format!("s{}", i + 1);
        let spawned = unix_ms();
        let run = measure::run(
            Command::new(roller)
                .arg("rollout")
                .arg("--inventory")
                .arg(fleet.inventory_path())
                .arg("--artifact")
                .arg(&jars[i % 2])
                .args(["--release", &release, "--batch", batch, "--output", "json"])
                .arg("--journal-dir")
                .arg(work.join("journal")),
            ROLLOUT_DEADLINE,
        )?;
        std::fs::write(work.join(format!("{release}.events.jsonl")), &run.stdout)?;
        if !run.status.success() {
            bail!("the rollout failed ({}): {}", run.status, run.stderr);
        }
        // Pre-flight is done when the last host's check has succeeded; counted from spawn, so
        // start-up, connecting to every host and taking the lock are in it.
        let preflight_done = run
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event"] == "step" && e["step"]["phase"] == "preflight")
            .filter_map(|e| e["step"]["unix_ms"].as_u64())
            .max()
            .unwrap_or(spawned);
        let preflight_ms = preflight_done.saturating_sub(spawned);
        println!(
            "{hosts:>5}  {batch:>5}  {:>6.1}  {preflight_ms:>13}  {:>8.1}",
            run.wall.as_secs_f64(),
            run.max_rss_kb as f64 / 1024.0
        );
        let ok = preflight_ms < PREFLIGHT_TARGET_MS && run.max_rss_kb < MEMORY_TARGET_KB;
        met &= ok;
        println!(
            "pre-flight of {hosts} hosts {preflight_ms} ms (target < {PREFLIGHT_TARGET_MS} ms), peak memory {:.1} MiB (target < 50 MiB): {}",
            run.max_rss_kb as f64 / 1024.0,
            if ok { "met" } else { "MISSED" }
        );
    }
    Ok(met)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
