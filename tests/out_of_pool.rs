//! "Out of the pool" checked against nginx's own access log: no request may be sent to a host
//! between the event that says roller took it out of the pool and the event that says it goes
//! back. Counting failed requests is not enough, since nginx retries a GET that hit a stopped
//! host on another server and the client never knows; the access log lists every server tried.
//!
//! One fleet of four hosts behind an nginx with two workers, under steady GET and POST load,
//! goes through several rollouts in a row: rolling at batch 1 and 2, a failed batch rolled
//! back, `rollback-all`, and a canary. The upstream block is a production one: pooled
//! keep-alive connections to the servers, least_conn, a shared zone, per-server parameters.
//! Every rewrite must keep it, and idle pooled connections must not hold a drain.

mod e2e;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use e2e::*;
use roller_fleet::{Behaviour, Fleet, FleetSpec, JarSpec, Load, LoadOptions, LoadReport};

/// The issue this guards against showed up at a few hundred requests a second.
const MIN_REQUESTS_PER_SECOND: f64 = 300.0;

/// A time when a host was out of the pool: from the end of the pool change that took it out
/// to the start of the one that put it back (Unix milliseconds).
#[derive(Debug)]
struct Out {
    host: String,
    from_ms: u64,
    until_ms: u64,
    rollout: String,
}

/// The times each host spent out of the pool, from roller's JSON events.
fn out_of_pool(run: &Run, rollout: &str) -> Vec<Out> {
    let mut since: BTreeMap<String, u64> = BTreeMap::new();
    let mut outs = Vec::new();
    for event in run.lines.iter().filter(|l| l["event"] == "step") {
        let step = &event["step"];
        let Some(down) = step["down"].as_array() else {
            continue;
        };
        let down: Vec<&str> = down.iter().map(|d| d.as_str().unwrap()).collect();
        let at = step["unix_ms"].as_u64().expect("events carry unix_ms");
        match step["state"].as_str().unwrap() {
            "succeeded" => {
                for host in &down {
                    since.entry(host.to_string()).or_insert(at);
                }
            }
            "started" => {
                let back: Vec<String> = since
                    .keys()
                    .filter(|h| !down.contains(&h.as_str()))
                    .cloned()
                    .collect();
                for host in back {
                    let from_ms = since.remove(&host).unwrap();
                    outs.push(Out {
                        host,
                        from_ms,
                        until_ms: at,
                        rollout: rollout.to_string(),
                    });
                }
            }
            _ => {}
        }
    }
    assert!(
        since.is_empty(),
        "{rollout}: roller left {since:?} out of the pool"
    );
    outs
}

/// One line of the fleet's access log: when nginx started on the request and every server it
/// sent the request to.
#[derive(Debug)]
struct Logged {
    started_ms: u64,
    servers: Vec<String>,
    line: String,
}

/// Lines in the fleet's `roller` format: `$upstream_addr $status $upstream_response_time
/// $request_method $request_uri $msec $request_time`. A retried request lists every server
/// tried (`a:1, b:1`), and `$msec` is when the request ended, so it started `$request_time`
/// earlier.
fn parse_access_log(text: &str) -> Vec<Logged> {
    let mut out = Vec::new();
    for line in text.lines() {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let mut servers = Vec::new();
        for token in &tokens {
            if *token == ":" {
                continue;
            }
            servers.push(token.trim_end_matches(',').to_string());
            if !token.ends_with(',') {
                break;
            }
        }
        let seconds = |t: &str| -> f64 { t.parse().unwrap_or_else(|_| panic!("{line}")) };
        let (Some(msec), Some(request_time)) = (tokens.iter().nth_back(1), tokens.last()) else {
            panic!("short access log line: {line}");
        };
        let started = seconds(msec) - seconds(request_time);
        out.push(Logged {
            started_ms: (started * 1000.0).round() as u64,
            servers,
            line: line.to_string(),
        });
    }
    out
}

/// The fleet's inventory with the upstream block people run in production, and `edit` applied.
fn production_inventory(fleet: &Fleet, name: &str, edit: impl FnOnce(&mut toml::Table)) -> PathBuf {
    let text = std::fs::read_to_string(fleet.inventory_path()).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    let mut block = toml::Table::new();
    block.insert("zone".into(), "64k".into());
    block.insert("balance".into(), "least_conn".into());
    block.insert("keepalive".into(), 16.into());
    block.insert("keepalive_timeout".into(), "60s".into());
    doc["balancer"]
        .as_table_mut()
        .unwrap()
        .insert("upstream_block".into(), block.into());
    for host in doc["hosts"].as_array_mut().unwrap() {
        let host = host.as_table_mut().unwrap();
        host.insert("max_fails".into(), 3.into());
        host.insert("fail_timeout".into(), "5s".into());
        host.insert("max_conns".into(), 500.into());
    }
    edit(&mut doc);
    let path = fleet.root().join(name);
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}

/// What every rewrite of the upstream file must keep.
fn assert_block_kept(fleet: &Fleet, after: &str) {
    let text = fleet.upstream_text();
    for kept in [
        "zone shop 64k;",
        "least_conn;",
        "keepalive 16;",
        "keepalive_timeout 60s;",
    ] {
        assert!(text.contains(kept), "{kept} lost after {after}:\n{text}");
    }
    assert_eq!(
        text.matches(" max_fails=3 fail_timeout=5s max_conns=500")
            .count(),
        4,
        "server parameters lost after {after}:\n{text}"
    );
}

/// Idle keep-alive connections to a drained host close with the old workers, so every drain
/// must end by its quiet window, well before the fleet's drain_timeout (10 s): a drain that
/// ran into it fails the step, and one held by pooled connections would come close to it.
fn assert_drains_quick(run: &Run, rollout: &str) {
    let mut drains = 0;
    for event in run.lines.iter().filter(|l| l["event"] == "step") {
        let step = &event["step"];
        if step["phase"] != "drain" {
            continue;
        }
        assert_ne!(step["state"], "failed", "{rollout}: a drain failed: {step}");
        if step["state"] == "succeeded" {
            drains += 1;
            let ms = step["elapsed_ms"].as_u64().unwrap();
            assert!(ms < 5_000, "{rollout}: a drain took {ms} ms: {step}");
        }
    }
    assert!(drains > 0, "{rollout}: no drain succeeded");
}

fn canary_inventory(fleet: &Fleet) -> PathBuf {
    production_inventory(fleet, "inventory-canary.toml", |doc| {
        canary_section(fleet, doc)
    })
}

fn canary_section(fleet: &Fleet, doc: &mut toml::Table) {
    make_canary(
        fleet,
        doc,
        &[
            ("weights", toml::Value::Array(vec![50.into(), 100.into()])),
            ("hold", "3s".into()),
            ("min_requests", 10.into()),
        ],
    );
}

fn report_is(run: &Run, code: i32, outcome: &str) {
    assert_eq!(run.code, Some(code), "{}", run.stderr);
    assert_eq!(run.report()["outcome"], outcome, "{:#}", run.report());
}

#[test]
fn nginx_sends_no_request_to_a_host_roller_took_out_of_the_pool() {
    let fleet = Fleet::up(FleetSpec::for_test("out-of-pool", 4)).unwrap();
    let inventory = production_inventory(&fleet, "inventory-production.toml", |_| {});
    let health_timeout = production_inventory(&fleet, "inventory-health-4s.toml", |doc| {
        doc["health"]
            .as_table_mut()
            .unwrap()
            .insert("timeout".into(), "4s".into());
    });
    let mut options = LoadOptions::new(6);
    options.pause = Duration::from_millis(2);
    options.post_percent = 30;
    let load = Load::start_with(&fleet.lb_url(), options);
    assert!(
        load.wait_for_requests(100, Duration::from_secs(30)),
        "traffic through nginx never got going"
    );
    let before = load.snapshot();
    let mut outs = Vec::new();

    let v2 = fleet.jar(&JarSpec::healthy("v2")).unwrap();
    let run = rollout(&inventory, &v2, "v2", "1");
    report_is(&run, 0, "succeeded");
    outs.extend(out_of_pool(&run, "rolling, batch 1"));
    assert_block_kept(&fleet, "rolling, batch 1");
    assert_drains_quick(&run, "rolling, batch 1");

    let v3 = fleet.jar(&JarSpec::healthy("v3")).unwrap();
    let run = rollout(&inventory, &v3, "v3", "2");
    report_is(&run, 0, "succeeded");
    outs.extend(out_of_pool(&run, "rolling, batch 2"));
    assert_block_kept(&fleet, "rolling, batch 2");
    assert_drains_quick(&run, "rolling, batch 2");

    // A release that never turns healthy: its batch goes back to v3.
    let bad = fleet
        .jar(&JarSpec::healthy("v4-bad").with_behaviour(Behaviour::NeverHealthy))
        .unwrap();
    let run = rollout(&health_timeout, &bad, "v4-bad", "1");
    report_is(&run, 4, "rolled-back");
    assert_eq!(run.report()["failure"]["step"], "health-check");
    outs.extend(out_of_pool(&run, "failed batch rolled back"));
    assert_block_kept(&fleet, "failed batch rolled back");
    assert_drains_quick(&run, "failed batch rolled back");

    // rollback-all: web-1 is done when web-2's copy of the release breaks, so both go back.
    let v4 = fleet.jar(&JarSpec::healthy("v4")).unwrap();
    let mut running = Running::start(&rollout_args(
        &health_timeout,
        &v4,
        "v4",
        "1",
        &["--on-failure", "rollback-all"],
    ));
    running.wait_for_step("switch", "web-2", "started");
    let jar = fleet.host_dir("web-2").join("shop/releases/v4/app.jar");
    std::fs::write(&jar, b"not a jar any more").unwrap();
    let run = running.finish();
    report_is(&run, 4, "rolled-back");
    assert_eq!(run.report()["failure"]["batch"], 2);
    assert_eq!(
        report_hosts(&run)[..2],
        [
            ("web-1".to_string(), "rolled-back".to_string(), true),
            ("web-2".to_string(), "rolled-back".to_string(), true),
        ]
    );
    outs.extend(out_of_pool(&run, "rollback-all"));
    assert_block_kept(&fleet, "rollback-all");
    assert_drains_quick(&run, "rollback-all");

    // A canary at half its share, then the rest of the fleet one host at a time.
    let v5 = fleet.jar(&JarSpec::healthy("v5")).unwrap();
    let run = rollout(&canary_inventory(&fleet), &v5, "v5", "1");
    report_is(&run, 0, "succeeded");
    outs.extend(out_of_pool(&run, "canary"));
    assert_block_kept(&fleet, "canary");
    assert_drains_quick(&run, "canary");

    let traffic = load.stop();
    assert_no_failed_requests(&traffic);
    let rate = rate(&before, &traffic);
    assert!(
        rate >= MIN_REQUESTS_PER_SECOND,
        "{rate:.0} requests/s through nginx, below the {MIN_REQUESTS_PER_SECOND} this test needs to mean something"
    );
    assert_fleet_on(&fleet, "v5", "v5");

    // Every host left the pool once in each successful rollout; the failed batch's one host
    // once; in rollback-all web-1 twice (its batch, then its undo) and web-2 once.
    assert_eq!(outs.len(), 4 + 4 + 1 + 3 + 4, "{outs:#?}");
    let log = parse_access_log(&std::fs::read_to_string(fleet.access_log_path()).unwrap());
    let port = fleet.spec().app_port;
    let mut sent_while_out = Vec::new();
    for out in &outs {
        let server = format!("{}:{port}", fleet.host_address(&out.host));
        let during: Vec<&Logged> = log
            .iter()
            .filter(|l| l.started_ms > out.from_ms && l.started_ms < out.until_ms)
            .collect();
        // Traffic flowed to the others meanwhile, so silence towards this host means something.
        assert!(
            out.until_ms - out.from_ms < 1000 || during.len() >= 50,
            "only {} requests in {} ms while {} was out ({})",
            during.len(),
            out.until_ms - out.from_ms,
            out.host,
            out.rollout
        );
        sent_while_out.extend(
            during
                .into_iter()
                .filter(|l| l.servers.contains(&server))
                .map(|l| {
                    format!(
                        "{} ({}, out {} to {}): +{} ms: {}",
                        out.host,
                        out.rollout,
                        out.from_ms,
                        out.until_ms,
                        l.started_ms - out.from_ms,
                        l.line
                    )
                }),
        );
    }
    assert!(
        sent_while_out.is_empty(),
        "nginx sent {} request(s) to hosts out of the pool:\n{}",
        sent_while_out.len(),
        sent_while_out.join("\n")
    );
}

fn rate(before: &LoadReport, after: &LoadReport) -> f64 {
    (after.total() - before.total()) as f64 / (after.elapsed - before.elapsed).as_secs_f64()
}
