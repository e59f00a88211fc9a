//! Reaching a host through a local command that carries the SSH bytes on its stdin and stdout,
//! as OpenSSH's `ProxyCommand` does (for example `aws ssm start-session ... AWS-StartSSHSession`
//! where hosts have no reachable port 22 at all).
//!
//! The command runs under `sh -c` with `%h`, `%p`, `%r` and `%n` replaced by the host's address,
//! port, login user and inventory name, each already quoted for sh, so a value can never become
//! shell syntax; `%%` is a literal `%`. The process lives as long as the connection and is
//! killed with it.

use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::transport::{Endpoint, TransportError};

/// How much of the command's stderr is kept to explain a failed connection.
const STDERR_KEPT: usize = 4096;

/// The command line for `endpoint`, placeholders replaced.
pub fn expand(template: &str, endpoint: &Endpoint, user: &str) -> Result<String, String> {
    let quote = |value: &str| {
        shlex::try_quote(value)
            .map(|q| q.into_owned())
            .map_err(|_| format!("{value:?} cannot be quoted for sh"))
    };
    let mut out = String::with_capacity(template.len());
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(&quote(&endpoint.address)?),
            Some('p') => out.push_str(&endpoint.port.to_string()),
            Some('r') => out.push_str(&quote(user)?),
            Some('n') => out.push_str(&quote(&endpoint.name)?),
            Some('%') => out.push('%'),
            Some(other) => {
                return Err(format!(
                    "unknown token %{other} (known: %h host, %p port, %r user, %n name, %% a percent sign)"
                ));
            }
            None => return Err("ends with a lone %".into()),
        }
    }
    Ok(out)
}

/// The command's stdout and stdin as one stream; dropping it kills the command.
pub(super) struct ProxyStream {
    stdout: ChildStdout,
    stdin: ChildStdin,
    _child: Child,
    stderr: StderrTail,
}

impl ProxyStream {
    /// What the command says on stderr (its last few KiB), for error messages.
    pub(super) fn stderr(&self) -> StderrTail {
        self.stderr.clone()
    }
}

/// A handle on the command's stderr that outlives the stream.
#[derive(Clone)]
pub(super) struct StderrTail {
    kept: Arc<Mutex<Vec<u8>>>,
    /// Becomes true once the command closed its stderr (it exited, as a rule).
    closed: tokio::sync::watch::Receiver<bool>,
}

impl StderrTail {
    /// The command's stderr, once it closed it or `wait` passed: a command that failed has
    /// usually exited, but its last words may still be in the pipe when the connection ends.
    pub(super) async fn settled(&self, wait: std::time::Duration) -> String {
        let mut closed = self.closed.clone();
        let _ = tokio::time::timeout(wait, closed.wait_for(|c| *c)).await;
        let bytes = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        crate::transport::printable(String::from_utf8_lossy(&bytes).trim())
    }
}

pub(super) fn spawn(
    template: &str,
    endpoint: &Endpoint,
    user: &str,
) -> Result<ProxyStream, TransportError> {
    let command = expand(template, endpoint, user).map_err(|e| {
        TransportError::Connect(format!("{}: ssh.proxy_command: {e}", endpoint.name))
    })?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            TransportError::Connect(format!(
                "{}: cannot start ssh.proxy_command ({command}): {e}",
                endpoint.name
            ))
        })?;
    let (Some(stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(TransportError::Connect(format!(
            "{}: ssh.proxy_command started without pipes",
            endpoint.name
        )));
    };
    let kept = Arc::new(Mutex::new(Vec::new()));
    let (closed_tx, closed) = tokio::sync::watch::channel(false);
    let sink = kept.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let mut kept = sink.lock().unwrap_or_else(|e| e.into_inner());
            kept.extend_from_slice(&buf[..n]);
            let excess = kept.len().saturating_sub(STDERR_KEPT);
            kept.drain(..excess);
        }
        let _ = closed_tx.send(true);
    });
    Ok(ProxyStream {
        stdout,
        stdin,
        _child: child,
        stderr: StderrTail { kept, closed },
    })
}

impl AsyncRead for ProxyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

impl AsyncWrite for ProxyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stdin).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdin).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdin).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(address: &str) -> Endpoint {
        Endpoint {
            name: "web-1".into(),
            address: address.into(),
            port: 2222,
            user: None,
            ..Endpoint::default()
        }
    }

    #[test]
    fn placeholders_become_quoted_words() {
        assert_eq!(
            expand(
                "aws ssm start-session --target %h --parameters portNumber=%p # %r %n 100%%",
                &endpoint("i-0abc"),
                "ec2-user"
            )
            .unwrap(),
            "aws ssm start-session --target i-0abc --parameters portNumber=2222 # ec2-user web-1 100%"
        );
    }

    #[test]
    fn a_value_from_the_inventory_never_becomes_shell_syntax() {
        let expanded = expand("nc %h %p", &endpoint("$(touch /tmp/x);b"), "u").unwrap();
        assert_eq!(expanded, "nc '$(touch /tmp/x);b' 2222");
    }

    #[test]
    fn unknown_tokens_are_refused_by_name() {
        let err = expand("nc %x %p", &endpoint("h"), "u").unwrap_err();
        assert!(err.contains("%x"), "{err}");
        assert!(expand("nc %", &endpoint("h"), "u").is_err());
    }
}
