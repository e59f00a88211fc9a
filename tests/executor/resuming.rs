//! What a rollout does with what it finds and what stops it: hosts skipped or taken first, the
//! capacity guard, the handover between batches, interrupts, and recover and resume.

use super::*;

#[tokio::test]
async fn hosts_already_on_the_release_and_healthy_are_skipped() {
    let world = world();
    {
        let mut w = world.lock().unwrap();
        w.current.insert("web-1".into(), "v2".into());
        w.running.insert("web-1".into(), "v2".into());
    }
    let fleet = fleet(world.clone());
    let (result, events) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded);
    assert!(fleet.commands("web-1").iter().all(|c| c != "restart-app"));
    let batches: BTreeSet<usize> = events
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| e.batch)
        .collect();
    assert_eq!(batches.len(), 2);
    assert_eq!(releases(&world), vec![("v2".into(), "v2".into()); 3]);
}

#[tokio::test]
async fn unhealthy_hosts_go_first_and_the_capacity_guard_refuses_a_batch_that_leaves_too_few() {
    let world = world();
    {
        let mut w = world.lock().unwrap();
        w.running.insert("web-2".into(), "crashed".into());
        w.running.insert("web-3".into(), "crashed".into());
    }
    let fleet = fleet(world.clone());
    let inventory = INVENTORY.replace(
        "drain_timeout = \"2s\"",
        "drain_timeout = \"2s\"\nmin_healthy = 2",
    );
    let (result, _) = rollout_on(&inventory, &fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();
    let failure = report.failure.as_ref().unwrap();
    assert_eq!(failure.failure.step, "capacity-check");
    assert!(
        failure
            .failure
            .message
            .contains("below balancer.min_healthy = 2"),
        "{failure:?}"
    );
    // Nothing was taken out of the pool and no host was touched.
    assert!(world.lock().unwrap().upstream_history.is_empty());
    for host in ["web-1", "web-2", "web-3"] {
        assert!(
            fleet.commands(host).iter().all(|c| c != "restart-app"),
            "{host}"
        );
    }
}

#[tokio::test]
async fn a_healthy_batch_returns_alone_when_the_next_may_not_leave_the_pool() {
    let world = world();
    let inner = fleet(world.clone());
    let w = world.clone();
    // web-3 stops answering its health check once web-1 runs the new release: by the end of
    // batch 1, taking web-2 out would leave one healthy host (web-1) of the two required.
    let fleet = MemoryFleet::new(
        {
            let inner = inner.clone();
            move |t: &str, c: &str, i: Option<&bytes::Bytes>| inner.answer(t, c, i)
        },
        move |t: &str, a: &str, p: u16, path: &str| {
            let web1_on_v2 =
                w.lock().unwrap().running.get("web-1").map(String::as_str) == Some("v2");
            if t == "web-3" && web1_on_v2 {
                return Ok(503);
            }
            inner.probe(t, a, p, path)
        },
    );
    let inventory = INVENTORY.replace(
        "drain_timeout = \"2s\"",
        "drain_timeout = \"2s\"\nmin_healthy = 2",
    );
    let (result, _) = rollout_on(&inventory, &fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();
    let failure = report.failure.as_ref().unwrap();
    assert_eq!(failure.batch, 2);
    assert_eq!(failure.failure.step, "capacity-check");
    // Batch 2 is reported as a refused batch always is: back (it never left), in the pool.
    assert_eq!(
        outcomes(&report),
        vec![
            (HostOutcome::Updated, true),
            (HostOutcome::RolledBack, true),
            (HostOutcome::Untouched, true)
        ]
    );
    // web-1 out, then back on its own; web-2 never left.
    let w = world.lock().unwrap();
    assert_eq!(w.upstream_history.len(), 2, "{:#?}", w.upstream_history);
    assert!(w.upstream_history[0].contains("10.0.1.1:8080 down;"));
    assert!(!w.upstream.contains("down"), "{}", w.upstream);
    drop(w);
    assert!(fleet.commands("web-2").iter().all(|c| c != "restart-app"));
    assert_eq!(
        releases(&world),
        vec![
            ("v2".into(), "v2".into()),
            ("v1".into(), "v1".into()),
            ("v1".into(), "v1".into())
        ]
    );
}

#[tokio::test]
async fn a_failure_in_a_batch_taken_out_at_the_handover_returns_it_to_the_pool() {
    let world = world();
    world.lock().unwrap().sick_on_v2 = vec!["web-2".into()];
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(report.failure.as_ref().unwrap().batch, 2);
    assert_eq!(
        outcomes(&report),
        vec![
            (HostOutcome::Updated, true),
            (HostOutcome::RolledBack, true),
            (HostOutcome::Untouched, true)
        ]
    );
    let w = world.lock().unwrap();
    // web-1 out; web-1 back with web-2 out; web-2 back after its rollback.
    assert_eq!(w.upstream_history.len(), 3, "{:#?}", w.upstream_history);
    assert!(w.upstream_history[1].contains("10.0.1.2:8080 down;"));
    assert_eq!(w.upstream_history[1].matches(" down;").count(), 1);
    assert!(!w.upstream.contains("down"), "{}", w.upstream);
}

#[tokio::test]
async fn an_interrupt_during_the_health_check_rolls_the_batch_back() {
    let world = world();
    world.lock().unwrap().sick_on_v2 = vec!["web-1".into()];
    let (tx, interrupt) = tokio::sync::watch::channel(None);
    let tx = Arc::new(tx);
    // Interrupt as soon as web-1's new release is being health-checked.
    let inner = fleet(world.clone());
    let w = world.clone();
    let trigger = tx.clone();
    let fleet = MemoryFleet::new(
        {
            let inner = inner.clone();
            move |t: &str, c: &str, i: Option<&bytes::Bytes>| inner.answer(t, c, i)
        },
        move |t: &str, a: &str, p: u16, path: &str| {
            if w.lock().unwrap().running.get(t).map(String::as_str) == Some("v2") {
                let _ = trigger.send(Some("SIGINT received".into()));
            }
            inner.probe(t, a, p, path)
        },
    );
    let inventory = INVENTORY.replace("timeout = \"20ms\"", "timeout = \"30s\"");
    let (result, _) = rollout_full(
        &inventory,
        &fleet,
        BatchSize::Hosts(1),
        Options::default(),
        interrupt,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Interrupted);
    assert_eq!(report.interrupted.as_deref(), Some("SIGINT received"));
    assert!(
        report.notes[0].contains("rolled back"),
        "{:?}",
        report.notes
    );
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
    assert!(!world.lock().unwrap().upstream.contains("down"));
    assert!(report.hosts.iter().all(|h| h.in_pool));
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Interrupted);
    assert_eq!(last.hosts["web-1"], Progress::RolledBack);
    assert!(last.out_of_pool.is_empty(), "{last:?}");
}

#[tokio::test]
async fn an_interrupt_once_the_batch_is_healthy_completes_it_instead() {
    let world = world();
    let (tx, interrupt) = tokio::sync::watch::channel(None);
    let inner = fleet(world.clone());
    let w = world.clone();
    let fleet = MemoryFleet::new(
        {
            let inner = inner.clone();
            move |t: &str, c: &str, i: Option<&bytes::Bytes>| inner.answer(t, c, i)
        },
        move |t: &str, a: &str, p: u16, path: &str| {
            let answer = inner.probe(t, a, p, path);
            let on_v2 = w.lock().unwrap().running.get(t).map(String::as_str) == Some("v2");
            if on_v2 && answer == Ok(200) {
                let _ = tx.send(Some("SIGTERM received".into()));
            }
            answer
        },
    );
    let (result, _) = rollout_full(
        INVENTORY,
        &fleet,
        BatchSize::Hosts(1),
        Options::default(),
        interrupt,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Interrupted);
    assert!(
        report.notes[0].contains("completed rather than rolled back"),
        "{:?}",
        report.notes
    );
    assert_eq!(
        releases(&world),
        vec![
            ("v2".into(), "v2".into()),
            ("v1".into(), "v1".into()),
            ("v1".into(), "v1".into())
        ]
    );
    assert!(!world.lock().unwrap().upstream.contains("down"));
    // The next batch was never taken out: web-1 returned alone.
    let history = world.lock().unwrap().upstream_history.clone();
    assert_eq!(history.len(), 2, "{history:#?}");
    assert!(history.iter().all(|u| !u.contains("10.0.1.2:8080 down")));
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Interrupted);
    assert_eq!(
        progress(&last),
        [Progress::Done, Progress::Pending, Progress::Pending]
    );
    assert!(last.out_of_pool.is_empty(), "{last:?}");
}

/// The index of the first restart on `host`.
fn restarted_at(fleet: &MemoryFleet, host: &str) -> usize {
    fleet
        .calls()
        .iter()
        .position(|c| matches!(c, Call::Exec { target, command, .. } if target == host && command == "restart-app"))
        .unwrap_or_else(|| panic!("{host} was never restarted"))
}

#[tokio::test]
async fn recover_takes_each_host_to_its_own_release_and_leaves_those_already_there() {
    let world = world();
    {
        let mut w = world.lock().unwrap();
        // A killed rollout left web-1 on v2; web-2 ran v0 before it and was switched too.
        for (host, release, previous) in [("web-1", "v2", "v1"), ("web-2", "v2", "v0")] {
            w.current.insert(host.into(), release.into());
            w.current
                .insert(format!("{host}.previous"), previous.into());
            w.running.insert(host.into(), release.into());
        }
        w.healthy = vec!["v0".into(), "v1".into(), "v2".into()];
    }
    let fleet = fleet(world.clone());
    let targets = BTreeMap::from([
        ("web-1".to_string(), "v1".to_string()),
        ("web-2".to_string(), "v0".to_string()),
        ("web-3".to_string(), "v1".to_string()),
    ]);
    let (result, _) = rollout_to(
        Target {
            release: "v1",
            targets: Some(targets),
            unfinished: BTreeSet::from(["web-2".to_string()]),
            ..Target::default()
        },
        &fleet,
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded);
    assert_eq!(
        releases(&world),
        [("v1", "v1"), ("v0", "v0"), ("v1", "v1")].map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let released: Vec<Option<&str>> = report.hosts.iter().map(|h| h.release.as_deref()).collect();
    assert_eq!(released, [Some("v1"), Some("v0"), Some("v1")]);
    // web-3 already ran its release; web-2, left partway, went before web-1.
    assert!(fleet.commands("web-3").iter().all(|c| c != "restart-app"));
    assert!(restarted_at(&fleet, "web-2") < restarted_at(&fleet, "web-1"));
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Succeeded);
    assert_eq!(progress(&last), [Progress::Done; 3]);
}

#[tokio::test]
async fn resume_redeploys_a_host_left_partway_first_even_if_it_runs_the_release() {
    let world = world();
    {
        let mut w = world.lock().unwrap();
        w.current.insert("web-3".into(), "v2".into());
        w.current.insert("web-3.previous".into(), "v1".into());
        w.running.insert("web-3".into(), "v2".into());
    }
    let fleet = fleet(world.clone());
    let (result, _) = rollout_to(
        Target {
            unfinished: BTreeSet::from(["web-3".to_string()]),
            ..Target::default()
        },
        &fleet,
    )
    .await;
    assert_eq!(result.unwrap().outcome, Outcome::Succeeded);
    assert_eq!(releases(&world), vec![("v2".into(), "v2".into()); 3]);
    assert!(restarted_at(&fleet, "web-3") < restarted_at(&fleet, "web-1"));
    assert!(restarted_at(&fleet, "web-1") < restarted_at(&fleet, "web-2"));
    assert_eq!(progress(&last_saved(&world)), [Progress::Done; 3]);
}
