//! The shell commands roller runs on app hosts: staging, switching links, restarting slots,
//! pruning, and reading the canary's access log. Every value is quoted through [`q`]; only the
//! operator's own commands (`app.restart`, a slot's stop) go in as written.

use super::{Configured, Sh, q, sh};
use crate::inventory::AppConfig;

/// Where a release lives on a host, relative to `app.dir`.
pub fn release_dir(release: &str) -> String {
    format!("releases/{release}")
}

/// Makes sure `app.dir` is usable and reports what pre-flight needs as `key=value` lines.
pub fn preflight(app: &AppConfig) -> String {
    sh![
        "d=",
        q(&app.dir),
        "; mkdir -p \"$d/releases\" && test -w \"$d/releases\" || { echo \"$d/releases is not writable\" >&2; exit 1; }; \
         printf 'free_kb=%s\\n' \"$(df -Pk \"$d/releases\" | awk 'NR==2 {print $4}')\"; \
         printf 'current=%s\\n' \"$(readlink \"$d/current\" 2>/dev/null)\"; \
         printf 'blue=%s\\ngreen=%s\\n' \"$(readlink \"$d/current-blue\" 2>/dev/null)\" \"$(readlink \"$d/current-green\" 2>/dev/null)\"",
    ]
    .into_string()
}

/// Reads, changing nothing, what `roller status` shows of an app host: the `current` and slot
/// links' targets as `key=value` lines, and one `release=<name>` line per directory in
/// `releases/`. Names are printed as they are; the caller checks them.
pub fn inspect(app: &AppConfig) -> String {
    sh![
        "d=",
        q(&app.dir),
        "; printf 'current=%s\\nblue=%s\\ngreen=%s\\n' \"$(readlink \"$d/current\" 2>/dev/null)\" \"$(readlink \"$d/current-blue\" 2>/dev/null)\" \"$(readlink \"$d/current-green\" 2>/dev/null)\"; \
         for r in \"$d\"/releases/*/; do [ -d \"$r\" ] || continue; r=${r%/}; printf 'release=%s\\n' \"${r##*/}\"; done; exit 0",
    ]
    .into_string()
}

/// The jar of `release` on the host, from `app.dir`.
fn jar_path(app: &AppConfig, release: &str) -> String {
    format!("{}/{}/{}", app.dir, release_dir(release), app.jar_name)
}

/// Prints `present` when the release's jar is already on the host with the right checksum.
pub fn artifact_present(app: &AppConfig, release: &str, sha256: &str) -> String {
    sh![
        "f=",
        q(&jar_path(app, release)),
        "; if [ -f \"$f\" ] && [ \"$(sha256sum < \"$f\" | cut -d' ' -f1)\" = ",
        q(sha256),
        " ]; then echo present; else echo absent; fi",
    ]
    .into_string()
}

/// Receives the jar on stdin into a partial file, verifies its SHA-256 on the host, and only
/// then gives it its final name, so a jar under its real name is always complete.
pub fn upload(app: &AppConfig, release: &str, sha256: &str) -> String {
    let part = q(&format!(".{}.part", app.jar_name));
    let sha = q(sha256);
    sh![
        "r=",
        q(&format!("{}/{}", app.dir, release_dir(release))),
        "; mkdir -p \"$r\" || exit 1; cat > \"$r\"/",
        &part,
        " || exit 1; \
         s=$(sha256sum < \"$r\"/",
        &part,
        " | cut -d' ' -f1); \
         if [ \"$s\" != ",
        &sha,
        " ]; then rm -f \"$r\"/",
        &part,
        "; printf 'checksum mismatch: expected %s, got %s\\n' ",
        &sha,
        " \"$s\" >&2; exit 1; fi; \
         mv -f \"$r\"/",
        &part,
        " \"$r\"/",
        q(&app.jar_name),
    ]
    .into_string()
}

/// `cd` into `app.dir` and check that the release's jar is there, saying which file is
/// missing: the path is printed as data (`printf '%s'`), never read as shell text.
fn enter_with_jar(app: &AppConfig, release: &str) -> Sh {
    let target = release_dir(release);
    sh![
        "cd ",
        q(&app.dir),
        " || exit 1; test -f ",
        q(&format!("{target}/{}", app.jar_name)),
        " || { printf '%s is missing\\n' ",
        q(&jar_path(app, release)),
        " >&2; exit 1; }; ",
    ]
}

/// Points a blue-green slot's link (`current-blue`, `current-green`) at the release, atomically.
/// A slot has no `.roller/previous`: going back means sending traffic to the other slot.
pub fn switch_link(app: &AppConfig, link: &str, release: &str) -> String {
    let link = q(link);
    sh![
        enter_with_jar(app, release),
        "mkdir -p .roller || exit 1; ln -sfn ",
        q(&release_dir(release)),
        " .roller/",
        &link,
        ".new && mv -T .roller/",
        &link,
        ".new ",
        &link,
    ]
    .into_string()
}

/// Records which blue-green slot gets traffic on the host itself, where a pending
/// [`keep_old`] timer reads it. The marker line also carries a token unique to this call, left
/// in `$m`, so that a timer only ever acts for the switch that scheduled it.
pub fn mark_live(app: &AppConfig, slot: &str) -> String {
    marking_live(app, slot).into_string()
}

fn marking_live(app: &AppConfig, slot: &str) -> Sh {
    let dir = q(&app.dir);
    sh![
        "mkdir -p ",
        &dir,
        "/.roller || exit 1; m=\"",
        // Slot names are the fixed words `blue` and `green`; anything else would be a bug,
        // and is quoted like any other value rather than trusted.
        q(slot),
        " $(date +%s%N)-$$\"; \
         printf '%s\\n' \"$m\" > ",
        &dir,
        "/.roller/live-slot.new && mv -f ",
        &dir,
        "/.roller/live-slot.new ",
        &dir,
        "/.roller/live-slot || exit 1",
    ]
}

/// Marks `live` as the live slot, then stops the old slot once `keep` has passed, unless
/// another switch (a switch-back, a later release) rewrote the marker in the meantime.
///
/// The timer must outlive the SSH session without holding it open: the step returns at once,
/// or the rollout would wait out `keep` (or its deadline) with the channel still open. Where
/// systemd runs, a transient timer (`systemd-run --on-active`) owns it, a user one for a user
/// other than root; otherwise, or if systemd refuses, `setsid -f` starts it in a session of its
/// own with every descriptor redirected, so neither the channel nor a hang-up reaches it.
pub fn keep_old(app: &AppConfig, live: &str, stop_old: &str, keep: std::time::Duration) -> String {
    let check = sh![
        "if [ \"$(cat ",
        q(&format!("{}/.roller/live-slot", app.dir)),
        " 2>/dev/null)\" = \"$1\" ]; then ",
        Configured(stop_old),
        "; fi",
    ]
    .into_string();
    let secs = keep.as_secs().max(1);
    let sleeping = format!("sleep {secs}; {check}");
    sh![
        marking_live(app, live),
        "; \
         if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then \
         if [ \"$(id -u)\" = 0 ]; then set --; else set -- --user; fi; \
         systemd-run \"$@\" --quiet --collect --unit=\"roller-keep-old-$(date +%s%N)-$$\" --on-active=",
        secs,
        "s --working-directory=\"$PWD\" \
         sh -c ",
        q(&check),
        " keep-old \"$m\" </dev/null >/dev/null 2>&1 && exit 0; \
         fi; \
         setsid -f sh -c ",
        q(&sleeping),
        " keep-old \"$m\" </dev/null >/dev/null 2>&1",
    ]
    .into_string()
}

/// Points `current` at the release with an atomic rename, remembering the release it replaces
/// in `.roller/previous` so that a rollback, even from another controller, knows where to go.
pub fn switch(app: &AppConfig, release: &str) -> String {
    let target = q(&release_dir(release));
    sh![
        enter_with_jar(app, release),
        "cur=$(readlink current 2>/dev/null); mkdir -p .roller || exit 1; \
         if [ -n \"$cur\" ] && [ \"$cur\" != ",
        &target,
        " ]; then printf '%s\\n' \"$cur\" > .roller/previous || exit 1; fi; \
         ln -sfn ",
        &target,
        " .roller/current.new && mv -T .roller/current.new current",
    ]
    .into_string()
}

/// Points `current` back at the release recorded by the last [`switch`].
pub fn switch_back(app: &AppConfig) -> String {
    sh![
        "cd ",
        q(&app.dir),
        " || exit 1; prev=$(cat .roller/previous 2>/dev/null); \
         if [ -z \"$prev\" ] || [ ! -d \"$prev\" ]; then echo \"no previous release recorded in .roller/previous\" >&2; exit 1; fi; \
         ln -sfn \"$prev\" .roller/current.new && mv -T .roller/current.new current && echo \"$prev\"",
    ]
    .into_string()
}

/// A host-side hook (`[hooks]`): the operator's command, run in `app.dir` with the release
/// the batch goes to and the host's inventory name in the environment.
pub fn hook(app: &AppConfig, release: &str, host: &str, command: &str) -> String {
    sh![
        "cd ",
        q(&app.dir),
        " || exit 1; ROLLER_RELEASE=",
        q(release),
        "; ROLLER_HOST=",
        q(host),
        "; export ROLLER_RELEASE ROLLER_HOST; ",
        Configured(command),
    ]
    .into_string()
}

/// What a rollback may go back to on a host: `previous=<what .roller/previous holds>`, then
/// `holds=<release>` for each release directory that has its jar. The names are read back as
/// untrusted text and checked by the release rules before any of them reaches a command.
pub fn releases_held(app: &AppConfig) -> String {
    sh![
        "cd ",
        q(&app.dir),
        " || exit 1; printf 'previous=%s\\n' \"$(cat .roller/previous 2>/dev/null | head -n 1)\"; \
         for r in releases/*/; do r=${r%/}; r=${r#releases/}; \
         if [ -f \"releases/$r/\"",
        q(&app.jar_name),
        " ]; then printf 'holds=%s\\n' \"$r\"; fi; done",
    ]
    .into_string()
}

/// Removes the oldest releases beyond `keep_releases`, never the live or the previous one.
pub fn prune(app: &AppConfig) -> String {
    sh![
        "cd ",
        q(&app.dir),
        "/releases || exit 1; live=$(basename \"$(readlink ../current)\"); \
         prev=$(basename \"$(cat ../.roller/previous 2>/dev/null)\"); \
         ls -1t | tail -n +",
        app.keep_releases + 1,
        " | while IFS= read -r r; do \
         if [ \"$r\" != \"$live\" ] && [ \"$r\" != \"$prev\" ]; then rm -rf -- \"$r\" && echo \"$r\"; fi; done",
    ]
    .into_string()
}

/// Blue-green: removes the oldest releases beyond `keep_releases`, never counting or removing
/// one that a slot's link (`current-blue`, `current-green`) or `current` points at: both slots'
/// releases are kept on top of `keep_releases`.
pub fn prune_slots(app: &AppConfig) -> String {
    sh![
        "cd ",
        q(&app.dir),
        "/releases || exit 1; \
         keep=\" $(for l in current current-blue current-green; do t=$(readlink \"../$l\") && printf '%s ' \"${t##*/}\"; done) \"; \
         ls -1t | while IFS= read -r r; do case \"$keep\" in *\" $r \"*) ;; *) printf '%s\\n' \"$r\";; esac; done | \
         tail -n +",
        app.keep_releases + 1,
        " | while IFS= read -r r; do rm -rf -- \"$r\" && echo \"$r\"; done",
    ]
    .into_string()
}

/// Prints the size of the canary's access log in bytes, the offset its hold starts from.
pub fn log_size(access_log: &str) -> String {
    let log = q(access_log);
    sh![
        "test -r ",
        &log,
        " || { echo 'cannot read the access log '",
        &log,
        " >&2; exit 1; }; wc -c < ",
        &log,
    ]
    .into_string()
}

/// Prints what the access log gained since the offset read on stdin, at most its last 16 MB:
/// a hold's worth of lines is what the canary is judged on, not a day's.
pub fn log_since(access_log: &str) -> String {
    sh![
        "IFS= read -r o && tail -c \"+$((o + 1))\" ",
        q(access_log),
        " | tail -c 16000000",
    ]
    .into_string()
}

/// Prints what `roller promote` or `roller abort` left in the decision file, if anything.
pub fn read_decision(file: &str) -> String {
    sh!["cat ", q(file), " 2>/dev/null; true"].into_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::quote;

    fn app(dir: &str) -> AppConfig {
        AppConfig {
            name: "shop".into(),
            dir: dir.into(),
            jar_name: "app.jar".into(),
            restart: "sudo systemctl restart shop".into(),
            port: 8080,
            keep_releases: 5,
            sudo: false,
        }
    }

    #[test]
    fn hostile_directory_names_stay_one_argument() {
        let cmd = switch(&app("/opt/my shop; rm -rf /"), "v2");
        assert!(
            cmd.starts_with("cd '/opt/my shop; rm -rf /' || exit 1;"),
            "{cmd}"
        );
    }

    #[test]
    fn switch_renames_atomically_and_records_previous() {
        let cmd = switch(&app("/opt/shop"), "v2");
        assert_eq!(
            cmd,
            "cd /opt/shop || exit 1; test -f releases/v2/app.jar || { printf '%s is missing\\n' /opt/shop/releases/v2/app.jar >&2; exit 1; }; \
             cur=$(readlink current 2>/dev/null); mkdir -p .roller || exit 1; \
             if [ -n \"$cur\" ] && [ \"$cur\" != releases/v2 ]; then printf '%s\\n' \"$cur\" > .roller/previous || exit 1; fi; \
             ln -sfn releases/v2 .roller/current.new && mv -T .roller/current.new current"
        );
    }

    #[test]
    fn keep_old_detaches_and_checks_the_marker() {
        let cmd = keep_old(
            &app("/opt/shop"),
            "green",
            "bin/stop-slot blue",
            std::time::Duration::from_secs(600),
        );
        assert!(
            cmd.ends_with(
                "setsid -f sh -c 'sleep 600; if [ \"$(cat /opt/shop/.roller/live-slot 2>/dev/null)\" = \"$1\" ]; then bin/stop-slot blue; fi' keep-old \"$m\" </dev/null >/dev/null 2>&1"
            ),
            "{cmd}"
        );
        assert!(cmd.contains("--on-active=600s"), "{cmd}");
        assert!(
            !cmd.replace("&&", "").replace(">&", "").contains('&'),
            "nothing is left to the shell's job control: {cmd}"
        );
    }

    /// Runs `keep_old` under bash, as a login shell does when it is also `sh` (Amazon Linux),
    /// with stdout and stderr on pipes as an SSH channel has them: the command must return at
    /// once, and the timer must still stop the old slot later, or not after a switch-back.
    #[test]
    fn keep_old_returns_at_once_under_bash_and_the_timer_fires_later() {
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};
        let dir = std::env::temp_dir().join(format!("roller-keep-old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let app = app(dir.to_str().unwrap());
        let stopped = |slot: &str| dir.join(format!("stopped-{slot}"));
        let run = |cmd: &str| {
            let started = Instant::now();
            // No systemd here: a test must not leave units behind on a developer's machine.
            let output = Command::new("bash")
                .arg("-c")
                .arg(cmd.replace("[ -d /run/systemd/system ]", "false"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .unwrap();
            assert!(output.status.success(), "{output:?}");
            started.elapsed()
        };
        let stop = |slot: &str| format!("touch {}", quote(stopped(slot).to_str().unwrap()));
        let took = run(&keep_old(
            &app,
            "green",
            &stop("blue"),
            Duration::from_secs(2),
        ));
        assert!(
            took < Duration::from_secs(1),
            "keep_old held the channel {took:?}"
        );
        // A switch-back before the first timer ends: blue is live again; its own timer stops green.
        let took = run(&keep_old(
            &app,
            "blue",
            &stop("green"),
            Duration::from_secs(3),
        ));
        assert!(
            took < Duration::from_secs(1),
            "keep_old held the channel {took:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !stopped("green").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            stopped("green").exists(),
            "the abandoned slot was never stopped"
        );
        assert!(
            !stopped("blue").exists(),
            "a timer stopped the slot a later switch made live"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// On a real directory, under sh: the releases both slots point at survive on top of
    /// `keep_releases`, and the oldest of the others go.
    #[test]
    fn prune_slots_keeps_both_slots_plus_keep_releases() {
        let dir = std::env::temp_dir().join(format!("roller-prune-slots-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let releases = dir.join("releases");
        // Oldest first; modification times one second apart so that `ls -t` orders them.
        for (i, r) in ["v1", "v2", "v3", "v4", "v5"].iter().enumerate() {
            let path = releases.join(r);
            std::fs::create_dir_all(&path).unwrap();
            let status = std::process::Command::new("touch")
                .arg("-d")
                .arg(format!("@{}", 1_700_000_000 + i as u64))
                .arg(&path)
                .status()
                .unwrap();
            assert!(status.success());
        }
        std::os::unix::fs::symlink("releases/v1", dir.join("current-blue")).unwrap();
        std::os::unix::fs::symlink("releases/v5", dir.join("current-green")).unwrap();
        let mut app = app(dir.to_str().unwrap());
        app.keep_releases = 2;
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(prune_slots(&app))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let mut left: Vec<String> = std::fs::read_dir(&releases)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["v1", "v3", "v4", "v5"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "v2\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn messages_print_values_as_data_never_as_shell_text() {
        let hostile = app("/opt/$(touch /tmp/pwned)\"`id`");
        for cmd in [
            switch(&hostile, "v2"),
            switch_link(&hostile, "current-blue", "v2"),
        ] {
            assert!(
                cmd.contains(
                    "printf '%s is missing\\n' '/opt/$(touch /tmp/pwned)\"`id`/releases/v2/app.jar'"
                ),
                "{cmd}"
            );
            assert!(!cmd.contains("echo \""), "{cmd}");
        }
    }

    /// Under sh, on a real file: the size, then only the lines written after it.
    #[test]
    fn the_access_log_is_read_from_the_offset_given_on_stdin() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let dir = tempfile_dir("log-since");
        let log = dir.join("access log");
        std::fs::write(&log, "before\n").unwrap();
        let sh = |cmd: &str, stdin: &str| {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(stdin.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let size = sh(&log_size(log.to_str().unwrap()), "");
        assert_eq!(size.trim(), "7");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"after\n")
            .unwrap();
        let since = sh(
            &log_since(log.to_str().unwrap()),
            &format!("{}\n", size.trim()),
        );
        assert_eq!(since, "after\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("roller-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn prune_keeps_the_configured_number() {
        let cmd = prune(&app("/opt/shop"));
        assert!(cmd.contains("tail -n +6"), "{cmd}");
    }
}
