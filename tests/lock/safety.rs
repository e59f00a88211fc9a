//! What keeps the lock safe when things go wrong: racing controllers, the host's mutex, hostile
//! or unusable state directories, fencing, file modes, a holder that is provably gone.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_eight_concurrent_acquires_exactly_one_wins() {
    let host = start_host(7);
    let spec = spec("state", Duration::from_secs(60));
    let mut controllers = Vec::new();
    for i in 0..8 {
        controllers.push((host.connect().await, LockInfo::new_for(&format!("v{i}"))));
    }
    let start = Arc::new(tokio::sync::Barrier::new(controllers.len()));
    let attempts = controllers.into_iter().map(|(t, me)| {
        let (spec, start) = (spec.clone(), start.clone());
        tokio::spawn(async move {
            start.wait().await;
            lock::acquire(&*t, &spec, &me, None).await
        })
    });
    let results: Vec<_> = bounded(futures::future::join_all(attempts))
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();

    let winners: Vec<&LockInfo> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|(info, _)| info))
        .collect();
    assert_eq!(winners.len(), 1, "{results:#?}");
    let winner = winners[0];
    for result in &results {
        match result {
            Ok((info, how)) => assert_eq!((info, how), (winner, &Acquired::Fresh)),
            Err(LockError::Held { holder, .. }) => assert_eq!(**holder, *winner),
            Err(e) => panic!("unexpected error {e}: {results:#?}"),
        }
    }
    let t = host.connect().await;
    assert_eq!(
        bounded(lock::read(&*t, &spec)).await.unwrap().as_ref(),
        Some(winner)
    );
}

/// Whether some process is blocked waiting for a flock on the file with inode `ino`
/// (`/proc/locks` lists waiters with a `->` marker, and files as `major:minor:inode`).
fn someone_waits_for_lock_on(ino: u64) -> bool {
    let needle = format!(":{ino} ");
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|line| line.contains("->") && line.contains(&needle))
}

/// The race the eight-way test above can only hope to hit, made deterministic: we hold the
/// host's mutex ourselves, let an acquire queue behind it, write another holder's lock inside
/// "our" critical section, and let go. Checking before taking the mutex, or not taking it at
/// all, would hand out a second lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_and_the_write_happen_under_the_hosts_mutex() {
    use std::os::unix::fs::MetadataExt;

    let host = start_host(10);
    let t = host.connect().await;
    let spec = spec("state", Duration::from_secs(60));
    let state = host.session_dir.clone().unwrap().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mutex = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join("shop.lock.mutex"))
        .unwrap();
    mutex.lock().unwrap();
    let ino = mutex.metadata().unwrap().ino();

    let bob = LockInfo::new_for("v3");
    let attempt = {
        let (t, spec, bob) = (t.clone(), spec.clone(), bob.clone());
        tokio::spawn(async move { lock::acquire(&*t, &spec, &bob, None).await })
    };
    bounded(async {
        while !someone_waits_for_lock_on(ino) {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(!attempt.is_finished());

    let alice = LockInfo {
        started: 1_000,
        lease_until: u64::from(u32::MAX),
        ..LockInfo::new_for("v2")
    };
    std::fs::write(
        state.join("shop.lock"),
        format!(
            "token={}\nowner={}\npid={}\nrelease={}\nstarted={}\nlease_until={}\n",
            alice.token, alice.owner, alice.pid, alice.release, alice.started, alice.lease_until
        ),
    )
    .unwrap();
    mutex.unlock().unwrap();

    match bounded(attempt).await.unwrap() {
        Err(LockError::Held { holder, .. }) => assert_eq!(*holder, alice),
        other => panic!("expected Held by the lock written under the mutex, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_state_dir_stays_one_quoted_path() {
    let host = start_host(8);
    let t = host.connect().await;
    let state_dir = "state dir/$(touch pwned1)/`touch pwned2`;touch pwned3/it's \"here\"";
    let spec = spec(state_dir, Duration::from_secs(60));
    let me = LockInfo::new_for("v2");
    let (held, _) = bounded(lock::acquire(&*t, &spec, &me, None)).await.unwrap();

    let lock_file = host
        .session_dir
        .clone()
        .unwrap()
        .join(state_dir)
        .join("shop.lock");
    let text = std::fs::read_to_string(&lock_file).unwrap();
    assert_eq!(
        text,
        format!(
            "token={}\nowner={}\npid={}\nrelease=v2\nbalancers=\nstarted={}\nlease_until={}\n",
            me.token, me.owner, me.pid, held.started, held.lease_until
        )
    );
    assert_eq!(bounded(lock::read(&*t, &spec)).await.unwrap(), Some(held));
    bounded(lock::release(&*t, &spec, &me.token)).await.unwrap();
    assert!(!lock_file.exists());

    let mut stray = Vec::new();
    let mut dirs = vec![host.session_dir.clone().unwrap().clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pwned")
            {
                stray.push(path.clone());
            }
            if path.is_dir() {
                dirs.push(path);
            }
        }
    }
    assert!(stray.is_empty(), "the shell ran a substitution: {stray:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_state_dir_is_a_clear_error_and_an_absolute_one_works() {
    let host = start_host(9);
    let t = host.connect().await;
    // Root may write anywhere, so "not writable" is made with a file where a directory belongs.
    std::fs::write(host.session_dir.clone().unwrap().join("not-a-dir"), "").unwrap();
    let bad = spec("not-a-dir/state", Duration::from_secs(60));
    let me = LockInfo::new_for("v2");
    match bounded(lock::acquire(&*t, &bad, &me, None)).await {
        Err(LockError::Remote(message)) => {
            assert!(message.contains("not-a-dir/state"), "{message}")
        }
        other => panic!("expected a Remote error, got {other:?}"),
    }
    // Nothing to read, release or unlock there, and asking is not an error.
    assert_eq!(bounded(lock::read(&*t, &bad)).await.unwrap(), None);
    bounded(lock::release(&*t, &bad, &me.token)).await.unwrap();

    let absolute = host
        .session_dir
        .clone()
        .unwrap()
        .join("abs/state")
        .to_str()
        .unwrap()
        .to_string();
    let good = spec(&absolute, Duration::from_secs(60));
    bounded(lock::acquire(&*t, &good, &me, None)).await.unwrap();
    assert!(
        host.session_dir
            .clone()
            .unwrap()
            .join("abs/state/shop.lock")
            .is_file()
    );
    assert!(
        host.session_dir
            .clone()
            .unwrap()
            .join("abs/state/shop.lock.mutex")
            .is_file()
    );
    assert!(
        !host
            .session_dir
            .clone()
            .unwrap()
            .join("abs/state/shop.lock.new")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_commands_run_only_while_the_lease_is_ours() {
    let host = start_host(20);
    let (a, b) = (host.connect().await, host.connect().await);
    // Long enough that two commands fit in the lease's provable part on a loaded machine.
    let short = spec("state", Duration::from_secs(10));
    let alice = LockInfo::new_for("v2");
    let bob = LockInfo::new_for("v3");
    let sent = Instant::now();
    let (held, _) = bounded(lock::acquire(&*a, &short, &alice, None))
        .await
        .unwrap();
    let fence = Arc::new(lock::Fence::new(short.clone(), alice.token.clone(), sent));
    let on_lock_host = lock::Fenced::new(a.clone(), fence.clone(), true);
    let elsewhere = lock::Fenced::new(b.clone(), fence.clone(), false);

    // While the lease is fresh, both run the command, and the command does not inherit the
    // mutex's descriptor (nothing it leaves behind can hold the lock).
    let out = bounded(on_lock_host.exec("echo changed > marker; ls /proc/self/fd", None, BOUND))
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert!(!out.stdout_text().lines().any(|fd| fd == "9"), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(host.session_dir.as_ref().unwrap().join("marker")).unwrap(),
        "changed\n"
    );
    assert!(
        bounded(elsewhere.exec("true", None, BOUND))
            .await
            .unwrap()
            .success()
    );

    // Another controller takes over once the lease ran out (nobody renewed: a paused
    // controller). The lock host refuses the command under the mutex, and the controller's
    // own clock already refuses it before it is sent.
    until_lb_clock_passes(&*b, held.lease_until).await;
    let (_, how) = bounded(lock::acquire(&*b, &short, &bob, None))
        .await
        .unwrap();
    assert!(matches!(how, Acquired::TookOver { .. }), "{how:?}");
    let refused = bounded(on_lock_host.exec("echo stale > marker", None, BOUND)).await;
    assert!(
        matches!(&refused, Err(TransportError::Fenced(_))),
        "{refused:?}"
    );
    let refused = bounded(elsewhere.exec("echo stale > marker", None, BOUND)).await;
    assert!(
        matches!(&refused, Err(TransportError::Fenced(_))),
        "{refused:?}"
    );
    // Even a command that got past the controller's clock is refused by the lock host.
    let out = bounded(a.exec(&fence.guard("echo stale > marker"), None, BOUND))
        .await
        .unwrap();
    assert_eq!(out.status, Some(lock::FENCED_OUT), "{out:?}");
    assert!(out.stderr_text().contains("fenced out"), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(host.session_dir.as_ref().unwrap().join("marker")).unwrap(),
        "changed\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_lease_whose_holder_is_provably_gone_is_taken_over() {
    let host = start_host(21);
    let (a, b) = (host.connect().await, host.connect().await);
    let spec = spec("state", Duration::from_secs(60));
    let mut ghost = LockInfo::new_for("v2");
    // A process of this machine that has exited: its pid is free.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    ghost.pid = child.id();
    bounded(lock::acquire(&*a, &spec, &ghost, None))
        .await
        .unwrap();
    let me = LockInfo::new_for("v3");
    let held = match bounded(lock::acquire(&*b, &spec, &me, None)).await {
        Err(LockError::Held { holder, .. }) => holder,
        other => panic!("expected Held, got {other:?}"),
    };
    assert!(lock::holder_is_gone(&held));
    // A live process of this machine, or a process elsewhere, is never taken for gone.
    let mut alive = held.clone();
    alive.pid = 1;
    assert!(!lock::holder_is_gone(&alive));
    let mut elsewhere = held.clone();
    elsewhere.owner = "ops@another-machine".into();
    assert!(!lock::holder_is_gone(&elsewhere));
    // Nor is a lock whose token roller never made.
    let mut forged = held.clone();
    forged.token = "$(reboot)".into();
    assert!(!lock::holder_is_gone(&forged));

    let (taken, how) = bounded(lock::take_over_gone(&*b, &spec, &me, &held))
        .await
        .unwrap();
    assert!(matches!(how, Acquired::TookOver { expired } if expired.token == ghost.token));
    assert_eq!(taken.token, me.token);
    // Taking over "the gone holder" when the lock changed hands meanwhile is refused.
    let third = LockInfo::new_for("v4");
    let refused = bounded(lock::take_over_gone(&*a, &spec, &third, &held)).await;
    assert!(
        matches!(refused, Err(LockError::Held { .. })),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_state_files_are_for_the_ssh_user_only() {
    use std::os::unix::fs::PermissionsExt;
    let host = start_host(22);
    let t = host.connect().await;
    // A directory someone made world-readable before roller ever ran.
    let state = host.session_dir.as_ref().unwrap().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let spec = spec("state", Duration::from_secs(60));
    bounded(lock::acquire(&*t, &spec, &LockInfo::new_for("v2"), None))
        .await
        .unwrap();
    let write = roller::journal::write_state_command("state", "shop");
    let out = bounded(t.exec(&write, Some(Bytes::from_static(b"{}")), BOUND))
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    let mode = |name: &str| {
        std::fs::metadata(state.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700);
    for file in ["shop.lock", "shop.lock.mutex", "shop.rollout.json"] {
        assert_eq!(mode(file), 0o600, "{file}");
    }
    // Nothing but those three: the state's temporary file was renamed, not left behind.
    let mut names: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["shop.lock", "shop.lock.mutex", "shop.rollout.json"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_waited_for_past_our_lease_is_fenced_from_when_it_was_taken() {
    let host = start_host(23);
    let (a, b) = (host.connect().await, host.connect().await);
    let long = spec("state", Duration::from_secs(60));
    let short = spec("state", Duration::from_secs(3));
    let alice = LockInfo::new_for("v2");
    let bob = LockInfo::new_for("v3");
    bounded(lock::acquire(&*a, &long, &alice, None))
        .await
        .unwrap();
    let releaser = tokio::spawn({
        let (a, long, token) = (a.clone(), long.clone(), alice.token.clone());
        async move {
            // Longer than bob's whole lease.
            sleep(Duration::from_secs(5)).await;
            lock::release(&*a, &long, &token).await.unwrap();
        }
    });
    let began = Instant::now();
    let (_, how, sent) = bounded(lock::acquire_sent(
        &*b,
        &short,
        &bob,
        Some(Duration::from_secs(15)),
    ))
    .await
    .unwrap();
    releaser.await.unwrap();
    assert_eq!(how, Acquired::Fresh);
    assert!(began.elapsed() >= Duration::from_secs(5));
    assert!(sent >= began + Duration::from_secs(4), "{:?}", sent - began);
    let fence = lock::Fence::new(short, bob.token.clone(), sent);
    fence.check().unwrap();
}
