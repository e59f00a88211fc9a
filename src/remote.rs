//! The shell commands roller runs on app hosts, built as plain strings.
//!
//! Building commands as data keeps `roller plan` honest (it prints these very strings) and lets
//! tests check them as text. Every value that comes from the inventory or the command line is
//! shell-quoted; only `app.restart`, which is a shell command by definition, is passed as is.

use crate::inventory::AppConfig;

/// Quotes one argument for POSIX `sh`. Inputs are validated single-line strings, so the only
/// failure (a NUL byte) cannot happen; we still refuse rather than emit something unquoted.
pub fn quote(arg: &str) -> String {
    shlex::try_quote(arg)
        .map(|q| q.into_owned())
        .unwrap_or_else(|_| "''".to_string())
}

/// Where a release lives on a host, relative to `app.dir`.
pub fn release_dir(release: &str) -> String {
    format!("releases/{release}")
}

/// Makes sure `app.dir` is usable and reports what pre-flight needs as `key=value` lines.
pub fn preflight(app: &AppConfig) -> String {
    format!(
        "d={dir}; mkdir -p \"$d/releases\" && test -w \"$d/releases\" || {{ echo \"$d/releases is not writable\" >&2; exit 1; }}; \
         printf 'free_kb=%s\\n' \"$(df -Pk \"$d/releases\" | awk 'NR==2 {{print $4}}')\"; \
         printf 'current=%s\\n' \"$(readlink \"$d/current\" 2>/dev/null)\"; \
         printf 'blue=%s\\ngreen=%s\\n' \"$(readlink \"$d/current-blue\" 2>/dev/null)\" \"$(readlink \"$d/current-green\" 2>/dev/null)\"",
        dir = quote(&app.dir)
    )
}

/// Prints `present` when the release's jar is already on the host with the right checksum.
pub fn artifact_present(app: &AppConfig, release: &str, sha256: &str) -> String {
    format!(
        "f={file}; if [ -f \"$f\" ] && [ \"$(sha256sum < \"$f\" | cut -d' ' -f1)\" = {sha} ]; then echo present; else echo absent; fi",
        file = quote(&format!(
            "{}/{}/{}",
            app.dir,
            release_dir(release),
            app.jar_name
        )),
        sha = quote(sha256),
    )
}

/// Receives the jar on stdin into a partial file, verifies its SHA-256 on the host, and only
/// then gives it its final name, so a jar under its real name is always complete.
pub fn upload(app: &AppConfig, release: &str, sha256: &str) -> String {
    format!(
        "r={rdir}; mkdir -p \"$r\" || exit 1; cat > \"$r\"/{part} || exit 1; \
         s=$(sha256sum < \"$r\"/{part} | cut -d' ' -f1); \
         if [ \"$s\" != {sha} ]; then rm -f \"$r\"/{part}; echo \"checksum mismatch: expected {sha_plain}, got $s\" >&2; exit 1; fi; \
         mv -f \"$r\"/{part} \"$r\"/{jar}",
        rdir = quote(&format!("{}/{}", app.dir, release_dir(release))),
        part = quote(&format!(".{}.part", app.jar_name)),
        jar = quote(&app.jar_name),
        sha = quote(sha256),
        sha_plain = sha256,
    )
}

/// Points a blue-green slot's link (`current-blue`, `current-green`) at the release, atomically.
/// A slot has no `.roller/previous`: going back means sending traffic to the other slot.
pub fn switch_link(app: &AppConfig, link: &str, release: &str) -> String {
    let target = release_dir(release);
    format!(
        "cd {dir} || exit 1; test -f {jar} || {{ echo \"{jar_plain} is missing\" >&2; exit 1; }}; \
         mkdir -p .roller || exit 1; ln -sfn {target} .roller/{link}.new && mv -T .roller/{link}.new {link}",
        dir = quote(&app.dir),
        jar = quote(&format!("{target}/{}", app.jar_name)),
        jar_plain = format!("{}/{target}/{}", app.dir, app.jar_name).replace('"', ""),
        target = quote(&target),
        link = quote(link),
    )
}

/// Records which blue-green slot gets traffic on the host itself, where a pending
/// [`keep_old`] timer reads it.
pub fn mark_live(app: &AppConfig, slot: &str) -> String {
    format!(
        "mkdir -p {dir}/.roller && printf '%s\\n' {slot} > {dir}/.roller/live-slot",
        dir = quote(&app.dir),
        slot = quote(slot),
    )
}

/// Marks `live` as the live slot, then, detached from the SSH session, stops the old slot once
/// `keep` has passed, unless a switch-back made it live again in the meantime.
pub fn keep_old(app: &AppConfig, live: &str, stop_old: &str, keep: std::time::Duration) -> String {
    let marker = format!("{}/.roller/live-slot", app.dir);
    let timer = format!(
        "sleep {secs}; if [ \"$(cat {marker} 2>/dev/null)\" = {live} ]; then {stop_old}; fi",
        secs = keep.as_secs(),
        marker = quote(&marker),
        live = quote(live),
    );
    format!(
        "{mark} && nohup sh -c {timer} >/dev/null 2>&1 </dev/null &",
        mark = mark_live(app, live),
        timer = quote(&timer),
    )
}

/// Points `current` at the release with an atomic rename, remembering the release it replaces
/// in `.roller/previous` so that a rollback, even from another controller, knows where to go.
pub fn switch(app: &AppConfig, release: &str) -> String {
    let target = release_dir(release);
    format!(
        "cd {dir} || exit 1; test -f {jar} || {{ echo \"{jar_plain} is missing\" >&2; exit 1; }}; \
         cur=$(readlink current 2>/dev/null); mkdir -p .roller || exit 1; \
         if [ -n \"$cur\" ] && [ \"$cur\" != {target} ]; then printf '%s\\n' \"$cur\" > .roller/previous || exit 1; fi; \
         ln -sfn {target} .roller/current.new && mv -T .roller/current.new current",
        dir = quote(&app.dir),
        jar = quote(&format!("{target}/{}", app.jar_name)),
        jar_plain = format!("{}/{target}/{}", app.dir, app.jar_name).replace('"', ""),
        target = quote(&target),
    )
}

/// Points `current` back at the release recorded by the last [`switch`].
pub fn switch_back(app: &AppConfig) -> String {
    format!(
        "cd {dir} || exit 1; prev=$(cat .roller/previous 2>/dev/null); \
         if [ -z \"$prev\" ] || [ ! -d \"$prev\" ]; then echo \"no previous release recorded in .roller/previous\" >&2; exit 1; fi; \
         ln -sfn \"$prev\" .roller/current.new && mv -T .roller/current.new current && echo \"$prev\"",
        dir = quote(&app.dir),
    )
}

/// Removes the oldest releases beyond `keep_releases`, never the live or the previous one.
pub fn prune(app: &AppConfig) -> String {
    format!(
        "cd {dir}/releases || exit 1; live=$(basename \"$(readlink ../current)\"); \
         prev=$(basename \"$(cat ../.roller/previous 2>/dev/null)\"); \
         ls -1t | tail -n +{first} | while IFS= read -r r; do \
         if [ \"$r\" != \"$live\" ] && [ \"$r\" != \"$prev\" ]; then rm -rf -- \"$r\" && echo \"$r\"; fi; done",
        dir = quote(&app.dir),
        first = app.keep_releases + 1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(dir: &str) -> AppConfig {
        AppConfig {
            name: "shop".into(),
            dir: dir.into(),
            jar_name: "app.jar".into(),
            restart: "sudo systemctl restart shop".into(),
            port: 8080,
            keep_releases: 5,
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
            "cd /opt/shop || exit 1; test -f releases/v2/app.jar || { echo \"/opt/shop/releases/v2/app.jar is missing\" >&2; exit 1; }; \
             cur=$(readlink current 2>/dev/null); mkdir -p .roller || exit 1; \
             if [ -n \"$cur\" ] && [ \"$cur\" != releases/v2 ]; then printf '%s\\n' \"$cur\" > .roller/previous || exit 1; fi; \
             ln -sfn releases/v2 .roller/current.new && mv -T .roller/current.new current"
        );
    }

    #[test]
    fn prune_keeps_the_configured_number() {
        let cmd = prune(&app("/opt/shop"));
        assert!(cmd.contains("tail -n +6"), "{cmd}");
    }
}
