//! The health check made from the host itself, for hosts whose sshd refuses port forwarding:
//! whichever HTTP client the host has (curl, wget, or bash's `/dev/tcp`) asks the app and prints
//! the status code.

use super::{Configured, q, sh};

/// Exit status when the host has no way to make the request (printed on stderr).
pub const NO_CLIENT: u32 = 3;

/// Prints the HTTP status of `GET http://address:port path`, asked within `timeout_secs`.
pub fn http_status(address: &str, port: u16, path: &str, timeout_secs: u64) -> String {
    let host = if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_string()
    };
    let url = format!("http://{host}:{port}{path}");
    sh![
        "u=",
        q(&url),
        "; t=",
        timeout_secs.max(1),
        "; if command -v curl >/dev/null 2>&1; then curl -s -o /dev/null -m \"$t\" -w '%{http_code}' \"$u\"; echo; \
         elif command -v wget >/dev/null 2>&1; then wget -S -q -O /dev/null -T \"$t\" -t 1 \"$u\" 2>&1 | awk '/^ *HTTP\\//{c=$2} END{print c}'; \
         elif command -v bash >/dev/null 2>&1; then \
         bash -c 'exec 3<>\"/dev/tcp/$0/$1\" || exit 1; printf \"GET %s HTTP/1.0\\r\\nHost: %s\\r\\n\\r\\n\" \"$2\" \"$0\" >&3; head -n 1 <&3' ",
        q(address),
        " ",
        port,
        " ",
        q(path),
        " | awk '{print $2}'; \
         else echo 'no curl, wget or bash on this host to check its health with' >&2; exit ",
        NO_CLIENT,
        "; fi",
    ]
    .into_string()
}

/// The operator's own `health.command`, run on the host: healthy when it exits 0.
pub fn configured(command: &str) -> String {
    sh![Configured(command)].into_string()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::process::Command;

    use super::*;

    /// Answers one request with `status`, on a loopback port of its own.
    fn one_answer(status: u16) -> (u16, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // The whole request before answering: closing with unread bytes would reset the
            // connection under the client's read.
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&chunk[..n]);
            }
            write!(
                conn,
                "HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            String::from_utf8_lossy(&request).to_string()
        });
        (port, server)
    }

    /// Runs the check under `sh` with only the tools in `tools` on PATH, as hosts differ.
    fn check_with(tools: &[&str], status: u16) -> (String, String) {
        let bin = tempfile::tempdir().unwrap();
        for tool in ["awk", "head", "printf", "cat"].iter().chain(tools) {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap();
            let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
            if path.starts_with('/') {
                std::os::unix::fs::symlink(&path, bin.path().join(tool)).unwrap();
            }
        }
        let (port, server) = one_answer(status);
        let out = Command::new("/bin/sh")
            .args(["-c", &http_status("127.0.0.1", port, "/actuator/health", 5)])
            .env("PATH", bin.path())
            .output()
            .unwrap();
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /actuator/health HTTP/1."),
            "{request:?}"
        );
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    fn have(tool: &str) -> bool {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap()
            .status
            .success()
    }

    #[test]
    fn curl_wget_or_bash_whichever_the_host_has() {
        for tool in ["curl", "wget", "bash"] {
            if !have(tool) {
                eprintln!("{tool} is not installed here; its path is not checked");
                continue;
            }
            let (status, stderr) = check_with(&[tool], 503);
            assert_eq!(status, "503", "with {tool}: {stderr}");
            let (status, stderr) = check_with(&[tool], 200);
            assert_eq!(status, "200", "with {tool}: {stderr}");
        }
    }

    #[test]
    fn a_host_without_any_client_says_so() {
        let out = Command::new("/bin/sh")
            .args(["-c", &http_status("127.0.0.1", 9, "/", 1)])
            .env("PATH", "/nonexistent")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(NO_CLIENT as i32));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no curl, wget or bash"));
    }
}
