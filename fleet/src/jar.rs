//! Builds demo service jars (`java/DemoApp.java`) that differ in version and behaviour.
//!
//! Tests need many artifacts (a good v2, one that never gets healthy, one that crashes, one
//! that answers 500s) without a Java build tool. The class files never change between them, so
//! they are compiled once per source text; each jar only adds its own properties file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::proc;

/// The Java source, embedded so that a jar can be built from any working directory.
pub const DEMO_SOURCE: &str = include_str!("../java/DemoApp.java");
pub const MAIN_CLASS: &str = "DemoApp";
const TOOL_TIMEOUT: Duration = Duration::from_secs(180);

/// How a demo jar behaves once started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Behaviour {
    Healthy,
    /// Serves traffic but `/actuator/health` stays 503.
    NeverHealthy,
    /// Exits with status 1 about 300 ms after binding its port.
    CrashOnStart,
    /// Answers 500 to this share of requests to `/`, evenly spread.
    Errors {
        percent: u8,
    },
}

impl Behaviour {
    fn property(self) -> &'static str {
        match self {
            Behaviour::Healthy => "healthy",
            Behaviour::NeverHealthy => "never-healthy",
            Behaviour::CrashOnStart => "crash",
            Behaviour::Errors { .. } => "errors",
        }
    }

    fn tag(self) -> String {
        match self {
            Behaviour::Errors { percent } => format!("errors{percent}"),
            other => other.property().to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JarSpec {
    /// Served by `/version` and in `X-App-Version`. Letters, digits, `.`, `_`, `-` only, since
    /// it ends up in a file name.
    pub version: String,
    pub behaviour: Behaviour,
    /// How long `/actuator/health` answers 503 after start, like a Spring context starting.
    pub startup_delay: Duration,
}

impl JarSpec {
    pub fn healthy(version: &str) -> Self {
        JarSpec {
            version: version.to_string(),
            behaviour: Behaviour::Healthy,
            startup_delay: Duration::from_millis(1000),
        }
    }

    pub fn with_behaviour(mut self, behaviour: Behaviour) -> Self {
        self.behaviour = behaviour;
        self
    }

    pub fn with_startup_delay(mut self, delay: Duration) -> Self {
        self.startup_delay = delay;
        self
    }

    fn properties(&self) -> String {
        let percent = match self.behaviour {
            Behaviour::Errors { percent } => percent,
            _ => 0,
        };
        format!(
            "version={}\nbehaviour={}\nstartup_delay_ms={}\nerror_percent={}\n",
            self.version,
            self.behaviour.property(),
            self.startup_delay.as_millis(),
            percent
        )
    }

    /// Same spec and same Java source give the same name; anything else a different one.
    pub fn file_name(&self) -> String {
        let key = fnv1a(&[DEMO_SOURCE.as_bytes(), self.properties().as_bytes()]);
        format!(
            "app-{}-{}-{}ms-{:08x}.jar",
            self.version,
            self.behaviour.tag(),
            self.startup_delay.as_millis(),
            key as u32
        )
    }
}

/// Builds (or reuses) the jar for `spec` in `out_dir` and returns its path.
pub fn build_jar(out_dir: &Path, spec: &JarSpec) -> anyhow::Result<PathBuf> {
    if spec.version.is_empty()
        || !spec
            .version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        bail!(
            "jar version {:?} must be non-empty and use only letters, digits, '.', '_', '-'",
            spec.version
        );
    }
    if let Behaviour::Errors { percent } = spec.behaviour
        && percent > 100
    {
        bail!("error percent {percent} is above 100");
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out_dir = std::path::absolute(out_dir)?;
    let target = out_dir.join(spec.file_name());
    if target.is_file() {
        return Ok(target);
    }
    let classes = compiled_classes()?;

    // Concurrent builders (test threads, test binaries) each work in a scratch directory and
    // publish with an atomic rename, so nobody ever sees a half-written jar.
    let scratch = out_dir.join(format!(".build-{}-{}", std::process::id(), next_id()));
    std::fs::create_dir_all(&scratch)?;
    let result = (|| {
        std::fs::write(scratch.join("roller-demo.properties"), spec.properties())?;
        let partial = scratch.join("app.jar");
        proc::run(
            Command::new(proc::find_jdk_tool("jar")?)
                .arg("--create")
                .arg("--file")
                .arg(&partial)
                .arg("--main-class")
                .arg(MAIN_CLASS)
                .arg("-C")
                .arg(&classes)
                .arg(".")
                .arg("-C")
                .arg(&scratch)
                .arg("roller-demo.properties"),
            TOOL_TIMEOUT,
        )?
        .check("jar --create")?;
        std::fs::rename(&partial, &target)
            .with_context(|| format!("publishing {}", target.display()))
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    Ok(target)
}

/// Compiles `DemoApp.java` once per source text (and JDK) into a cache under the target
/// directory and returns the classes directory.
pub fn compiled_classes() -> anyhow::Result<PathBuf> {
    // One javac at a time in this process; other processes are handled by the rename below.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());

    let javac = proc::find_jdk_tool("javac")?;
    let key = fnv1a(&[DEMO_SOURCE.as_bytes(), javac.as_os_str().as_encoded_bytes()]);
    let cache = crate::target_dir().join("roller-fleet");
    let classes = cache.join(format!("classes-{key:016x}"));
    if classes.join(format!("{MAIN_CLASS}.class")).is_file() {
        return Ok(classes);
    }
    let scratch = cache.join(format!(".javac-{}-{}", std::process::id(), next_id()));
    let src = scratch.join("src");
    let out = scratch.join("classes");
    std::fs::create_dir_all(&src)?;
    std::fs::create_dir_all(&out)?;
    let result = (|| {
        let source = src.join(format!("{MAIN_CLASS}.java"));
        std::fs::write(&source, DEMO_SOURCE)?;
        proc::run(
            Command::new(&javac)
                .arg("--release")
                .arg("17")
                .arg("-nowarn")
                .arg("-d")
                .arg(&out)
                .arg(&source),
            TOOL_TIMEOUT,
        )?
        .check("javac DemoApp.java")?;
        match std::fs::rename(&out, &classes) {
            Ok(()) => Ok(()),
            // Another process published the same classes first.
            Err(_) if classes.join(format!("{MAIN_CLASS}.class")).is_file() => Ok(()),
            Err(e) => Err(e).with_context(|| format!("publishing {}", classes.display())),
        }
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    Ok(classes)
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// FNV-1a: stable across Rust versions (unlike `DefaultHasher`), which matters for names that
/// persist on disk; collisions only cost a rebuild-miss, so no cryptographic hash is needed.
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator, so ("ab", "c") and ("a", "bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Stdio};
    use std::sync::mpsc;
    use std::time::Instant;

    /// A demo jar started directly (no fleet) on an ephemeral port, killed on drop.
    struct Running {
        child: Child,
        authority: String,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn run_jar(jar: &Path) -> Running {
        let java = proc::find_jdk_tool("java").unwrap();
        let mut child = Command::new(java)
            .args(["-Xmx64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
            .arg("-Dserver.address=127.0.0.1")
            .arg("-Dserver.port=0")
            .arg("-jar")
            .arg(jar)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Port 0 avoids clashes with parallel tests; the app logs the port it got.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(at) = line.split(" listening on ").nth(1) {
                    let _ = tx.send(at.trim().to_string());
                }
            }
        });
        let authority = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the demo app did not report its port within 60s");
        Running { child, authority }
    }

    fn wait_status(authority: &str, path: &str, want: u16, within: Duration) -> u16 {
        let deadline = Instant::now() + within;
        loop {
            let status = crate::http::get(authority, path, Duration::from_secs(5))
                .map(|r| r.status)
                .unwrap_or(0);
            if status == want || Instant::now() >= deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn out_dir(name: &str) -> PathBuf {
        crate::target_dir()
            .join("fleet-tests")
            .join(format!("jar-{name}-{}", std::process::id()))
    }

    #[test]
    fn jars_report_their_own_version() {
        let dir = out_dir("versions");
        let v1 = build_jar(
            &dir,
            &JarSpec::healthy("v1").with_startup_delay(Duration::ZERO),
        )
        .unwrap();
        let v2 = build_jar(
            &dir,
            &JarSpec::healthy("v2").with_startup_delay(Duration::ZERO),
        )
        .unwrap();
        assert_ne!(v1, v2);
        assert_eq!(
            build_jar(
                &dir,
                &JarSpec::healthy("v1").with_startup_delay(Duration::ZERO)
            )
            .unwrap(),
            v1,
            "same spec must reuse the same jar"
        );

        let (a, b) = (run_jar(&v1), run_jar(&v2));
        let version = |app: &Running| {
            let r = crate::http::get(&app.authority, "/version", Duration::from_secs(10)).unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.header("X-App-Version"), Some(r.text().trim()));
            r.text().trim().to_string()
        };
        assert_eq!(version(&a), "v1");
        assert_eq!(version(&b), "v2");
        assert_eq!(
            wait_status(
                &a.authority,
                "/actuator/health",
                200,
                Duration::from_secs(30)
            ),
            200
        );

        let post = crate::http::request(
            &b.authority,
            "POST",
            "/",
            Some(b"12345"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(post.status, 200);
        assert!(post.text().contains("received 5 bytes"), "{}", post.text());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sigterm_lets_in_flight_requests_finish_and_refuses_new_ones() {
        let dir = out_dir("sigterm");
        let jar = build_jar(&dir, &JarSpec::healthy("drain")).unwrap();
        let mut app = run_jar(&jar);
        let authority = app.authority.clone();
        let slow = std::thread::spawn(move || {
            crate::http::get(&authority, "/slow?ms=3000", Duration::from_secs(30))
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !crate::http::get(&app.authority, "/stats", Duration::from_secs(5))
            .unwrap()
            .text()
            .contains("in_flight=1")
        {
            assert!(Instant::now() < deadline, "the slow request never arrived");
            std::thread::sleep(Duration::from_millis(10));
        }

        let started = Instant::now();
        assert!(proc::signal(app.child.id(), libc::SIGTERM));
        // The listening socket closes at once while the slow request is still running.
        while crate::http::get(&app.authority, "/version", Duration::from_secs(5)).is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "still accepting after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !slow.is_finished(),
            "the listener closed only after the request finished"
        );
        let response = slow.join().unwrap().expect("in-flight request completes");
        assert_eq!(response.status, 200);
        proc::wait_child(&mut app.child, Duration::from_secs(15)).unwrap();
        // Exits as soon as the request is done, not after the 10 s grace period.
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failure_behaviours() {
        let dir = out_dir("behaviours");
        let never = build_jar(
            &dir,
            &JarSpec::healthy("never")
                .with_behaviour(Behaviour::NeverHealthy)
                .with_startup_delay(Duration::ZERO),
        )
        .unwrap();
        let errors = build_jar(
            &dir,
            &JarSpec::healthy("errors").with_behaviour(Behaviour::Errors { percent: 25 }),
        )
        .unwrap();
        let crash = build_jar(
            &dir,
            &JarSpec::healthy("crash").with_behaviour(Behaviour::CrashOnStart),
        )
        .unwrap();

        let never = run_jar(&never);
        let errors = run_jar(&errors);
        let mut crash = run_jar(&crash);

        // Never healthy: 503 although its startup delay is zero, yet it serves `/`.
        assert_eq!(
            crate::http::get(&never.authority, "/actuator/health", Duration::from_secs(5))
                .unwrap()
                .status,
            503
        );
        assert_eq!(
            crate::http::get(&never.authority, "/", Duration::from_secs(5))
                .unwrap()
                .status,
            200
        );

        let failed = (0..40)
            .filter(|_| {
                crate::http::get(&errors.authority, "/", Duration::from_secs(5))
                    .unwrap()
                    .status
                    == 500
            })
            .count();
        assert_eq!(failed, 10, "25% of 40 requests");

        let status = proc::wait_child(&mut crash.child, Duration::from_secs(30)).unwrap();
        assert_eq!(status.code(), Some(1));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
