//! A minimal blocking HTTP/1.1 client over `std::net`, strict about what counts as a response.
//!
//! Health probes and the load generator must notice every truncated or reset response (that is
//! exactly what a careless rollout produces), so each request uses its own connection with
//! `Connection: close`, reads to EOF and checks the body against Content-Length. Pulling in a
//! full HTTP stack would add retries and pooling that hide those failures.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Names as sent; look them up with [`Response::header`], which ignores case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Splits `http://host:port/path` into (`host:port`, `/path`). Only plain http is supported.
pub fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

pub fn get(authority: &str, path: &str, timeout: Duration) -> anyhow::Result<Response> {
    request(authority, "GET", path, None, timeout)
}

/// One request on a fresh connection; `timeout` bounds the whole exchange, connect included.
pub fn request(
    authority: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let deadline = Instant::now() + timeout;
    let addr: SocketAddr = authority
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {authority}"))?;
    let remaining = |deadline: Instant| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .context("timed out")
    };
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: roller-fleet\r\n"
    );
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: text/plain\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut wire = head.into_bytes();
    wire.extend_from_slice(body.unwrap_or_default());
    stream.write_all(&wire).context("sending request")?;

    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        stream.set_read_timeout(Some(remaining(deadline).context("reading response")?))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "timed out after {timeout:?} reading response ({} bytes so far)",
                    raw.len()
                )
            }
            Err(e) => {
                return Err(e).context(format!("reading response ({} bytes so far)", raw.len()));
            }
        }
    }
    parse(&raw, method == "HEAD")
}

fn parse(raw: &[u8], head_request: bool) -> anyhow::Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("incomplete response headers ({} bytes)", raw.len()))?;
    let head = std::str::from_utf8(&raw[..end]).context("response headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x status line: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut response = Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    };
    if response
        .header("Transfer-Encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        response.body = dechunk(&response.body)?;
    } else if let Some(len) = response.header("Content-Length") {
        let len: usize = len.parse().context("bad Content-Length")?;
        if !head_request && response.body.len() != len {
            bail!(
                "truncated response: status {status}, Content-Length {len}, got {} bytes",
                response.body.len()
            );
        }
    }
    Ok(response)
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunked body")?;
        let size_text = std::str::from_utf8(&data[..line_end])?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).context("bad chunk size")?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunked body");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_length() {
        let ok = parse(
            b"HTTP/1.1 200 OK\r\nX-App-Version: v1\r\nContent-Length: 2\r\n\r\nhi",
            false,
        )
        .unwrap();
        assert_eq!(ok.status, 200);
        assert_eq!(ok.header("x-app-version"), Some("v1"));
        assert_eq!(ok.text(), "hi");
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhi", false).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le", false).is_err());
        let chunked = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n1\r\n!\r\n0\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(chunked.text(), "hi!");
    }

    #[test]
    fn splits_urls() {
        assert_eq!(
            split_url("http://127.1.2.10:8000").unwrap(),
            ("127.1.2.10:8000".to_string(), "/".to_string())
        );
        assert_eq!(
            split_url("http://h/x?y").unwrap(),
            ("h:80".to_string(), "/x?y".to_string())
        );
    }
}
