//! One authenticated connection to one host: commands on session channels, HTTP checks on
//! direct-tcpip channels, each bounded by the caller's deadline and closed whatever happens.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use russh::client::{self, Msg};
use russh::{ChannelMsg, ChannelOpenFailure, ChannelWriteHalf, Disconnect, Sig};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::{Instant, sleep, timeout_at};

use super::Backoff;
use super::host_key::HostKeyPolicy;
use crate::transport::{ExecOutput, Transport, TransportError};

/// Larger than the SSH packet size so each write hands russh many packets at once; russh slices
/// `Bytes` without copying, so the chunk size costs no memory.
const STDIN_CHUNK: usize = 256 * 1024;
/// The most output kept from one command, per stream: far above what any command roller sends
/// prints (a canary's access-log slice is bounded below it).
pub const MAX_OUTPUT: usize = 64 << 20;
/// How long closing a connection may take: the goodbye is a courtesy, not worth a hang.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);
/// An HTTP status line longer than this is not from the service we are checking.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// One authenticated connection to one host.
pub struct SshTransport {
    pub(super) name: String,
    pub(super) handle: Arc<client::Handle<HostKeyPolicy>>,
    /// Caps open channels below the server's MaxSessions; closed on `close()`.
    pub(super) channels: Semaphore,
}

impl std::fmt::Debug for SshTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshTransport")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChannelKind {
    Session,
    DirectTcpip,
}

impl SshTransport {
    fn lost(&self, e: impl std::fmt::Display) -> TransportError {
        TransportError::Disconnected(format!("{}: {e}", self.name))
    }

    fn session_error(&self, e: russh::Error) -> TransportError {
        if self.handle.is_closed() {
            return self.lost(e);
        }
        match e {
            russh::Error::ChannelOpenFailure(reason) => {
                TransportError::Channel(format!("{}: channel refused: {reason:?}", self.name))
            }
            russh::Error::SendError
            | russh::Error::Disconnect
            | russh::Error::HUP
            | russh::Error::IO(_)
            | russh::Error::KeepaliveTimeout
            | russh::Error::InactivityTimeout => self.lost(e),
            other => TransportError::Channel(format!("{}: {other}", self.name)),
        }
    }

    /// Opens a channel in a task of its own: if the caller gives up while the open is in flight,
    /// the task still receives the channel and closes it, so no server-side session leaks and
    /// eats into MaxSessions.
    async fn open_once(
        &self,
        kind: ChannelKind,
        address: &str,
        port: u16,
    ) -> Result<russh::Channel<Msg>, russh::Error> {
        let handle = self.handle.clone();
        let address = address.to_string();
        let (reply, opened) = oneshot::channel();
        tokio::spawn(async move {
            let result = match kind {
                ChannelKind::Session => handle.channel_open_session().await,
                ChannelKind::DirectTcpip => {
                    handle
                        .channel_open_direct_tcpip(address, u32::from(port), "127.0.0.1", 0)
                        .await
                }
            };
            if let Err(Ok(orphan)) = reply.send(result) {
                let _ = orphan.close().await;
            }
        });
        opened.await.unwrap_or(Err(russh::Error::Disconnect))
    }

    /// Opens a channel, retrying refusals that mean "not now" (MaxSessions still counting a
    /// channel we already closed) until `until`.
    async fn open(
        &self,
        kind: ChannelKind,
        address: &str,
        port: u16,
        until: Instant,
    ) -> Result<russh::Channel<Msg>, TransportError> {
        let mut backoff = Backoff::new();
        loop {
            let refusal = match self.open_once(kind, address, port).await {
                Ok(channel) => return Ok(channel),
                Err(russh::Error::ChannelOpenFailure(reason)) => reason,
                Err(e) => return Err(self.session_error(e)),
            };
            let retry = match kind {
                // OpenSSH refuses a session past MaxSessions with a generic reason (9.2 says
                // "connect failed"), so every refusal of a session is taken as "not now".
                ChannelKind::Session => true,
                // For direct-tcpip "connect failed" is the answer: nothing listens there.
                ChannelKind::DirectTcpip => {
                    matches!(refusal, ChannelOpenFailure::ResourceShortage)
                }
            };
            if kind == ChannelKind::DirectTcpip
                && refusal == ChannelOpenFailure::AdministrativelyProhibited
            {
                return Err(TransportError::ForwardingRefused {
                    host: self.name.clone(),
                    target: format!("{address}:{port}"),
                });
            }
            let pause = backoff.next();
            if !retry || Instant::now() + pause >= until {
                return Err(TransportError::Channel(match kind {
                    ChannelKind::Session => {
                        format!("{}: session channel refused: {refusal:?}", self.name)
                    }
                    ChannelKind::DirectTcpip => format!(
                        "{}: cannot reach {address}:{port} from the host: {refusal:?}",
                        self.name
                    ),
                }));
            }
            tracing::debug!(host = %self.name, ?refusal, "channel refused, retrying");
            sleep(pause).await;
        }
    }

    async fn exec_inner(
        &self,
        command: &str,
        stdin: Option<Bytes>,
        until: Instant,
    ) -> Result<ExecOutput, TransportError> {
        let _permit = self
            .channels
            .acquire()
            .await
            .map_err(|_| self.lost("session closed"))?;
        let channel = self.open(ChannelKind::Session, "", 0, until).await?;
        let (mut reader, writer) = channel.split();
        let guard = CloseOnDrop::new(writer, Some(Sig::TERM));
        let writer = guard.writer();
        writer
            .exec(true, crate::transport::posix_sh(command))
            .await
            .map_err(|e| self.session_error(e))?;

        let feed = async {
            if let Some(data) = stdin {
                let mut offset = 0;
                while offset < data.len() {
                    let end = (offset + STDIN_CHUNK).min(data.len());
                    writer.data_bytes(data.slice(offset..end)).await?;
                    offset = end;
                }
            }
            // Always: a command reading stdin must see EOF rather than wait forever.
            writer.eof().await
        };
        let mut feed = std::pin::pin!(feed);
        let mut feeding = true;
        let mut output = ExecOutput::default();
        loop {
            // Reading goes on while stdin is written: a command that exits (or fills its
            // stdout) without draining stdin would otherwise leave the write waiting forever
            // for window space.
            let message = tokio::select! {
                fed = &mut feed, if feeding => {
                    feeding = false;
                    if let Err(e) = fed {
                        // The command may have closed the channel; its exit status tells more.
                        tracing::debug!(host = %self.name, error = %e, "stdin not fully delivered");
                    }
                    continue;
                }
                message = reader.wait() => message,
            };
            match message {
                Some(ChannelMsg::Data { data }) => {
                    self.capture(&mut output.stdout, &data, "stdout")?
                }
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                    self.capture(&mut output.stderr, &data, "stderr")?
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => output.status = Some(exit_status),
                Some(ChannelMsg::Failure) => {
                    return Err(TransportError::Channel(format!(
                        "{}: server refused to run the command",
                        self.name
                    )));
                }
                Some(ChannelMsg::Close) => {
                    // russh has already answered the server's close.
                    guard.closed();
                    return Ok(output);
                }
                // russh forwards the server's close before dropping a channel, so a channel
                // that simply ends means the whole connection is gone.
                None => {
                    guard.closed();
                    return match output.status {
                        // The command did finish; only the goodbye was lost.
                        Some(_) => Ok(output),
                        None => Err(self.lost("connection closed while a command was running")),
                    };
                }
                Some(_) => {}
            }
        }
    }

    /// Keeps a command's output, up to [`MAX_OUTPUT`]: a host that prints without end must
    /// fail its step, not grow the controller until it dies. Past the cap the channel is closed
    /// (with SIGTERM) as the error drops it.
    fn capture(&self, into: &mut Vec<u8>, data: &[u8], stream: &str) -> Result<(), TransportError> {
        if into.len() + data.len() > MAX_OUTPUT {
            return Err(TransportError::Channel(format!(
                "{}: the command printed more than {} MiB on {stream}; stopped it",
                self.name,
                MAX_OUTPUT >> 20
            )));
        }
        into.extend_from_slice(data);
        Ok(())
    }

    async fn http_get_inner(
        &self,
        address: &str,
        port: u16,
        path: &str,
        until: Instant,
    ) -> Result<u16, TransportError> {
        let _permit = self
            .channels
            .acquire()
            .await
            .map_err(|_| self.lost("session closed"))?;
        let channel = self
            .open(ChannelKind::DirectTcpip, address, port, until)
            .await?;
        let (mut reader, writer) = channel.split();
        let guard = CloseOnDrop::new(writer, None);
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        guard
            .writer()
            .data_bytes(Bytes::from(request))
            .await
            .map_err(|e| self.session_error(e))?;
        let mut received = Vec::new();
        let status_line = loop {
            if let Some(end) = received.iter().position(|&b| b == b'\n') {
                break String::from_utf8_lossy(&received[..end])
                    .trim_end()
                    .to_string();
            }
            if received.len() > MAX_STATUS_LINE {
                return Err(TransportError::Channel(format!(
                    "{}: http://{address}:{port}{path}: no HTTP status line in the first {MAX_STATUS_LINE} bytes",
                    self.name
                )));
            }
            match reader.wait().await {
                Some(ChannelMsg::Data { data }) => received.extend_from_slice(&data),
                Some(ChannelMsg::Eof | ChannelMsg::Close) | None => {
                    if self.handle.is_closed() {
                        return Err(self.lost("connection closed during an HTTP check"));
                    }
                    return Err(TransportError::Channel(format!(
                        "{}: http://{address}:{port}{path}: connection closed before a status line ({} bytes received)",
                        self.name,
                        received.len()
                    )));
                }
                Some(_) => {}
            }
        };
        // Dropping the guard closes the channel: the rest of the response is not needed.
        drop(guard);
        parse_status_line(&status_line).ok_or_else(|| {
            TransportError::Channel(format!(
                "{}: http://{address}:{port}{path}: not an HTTP status line: {status_line:?}",
                self.name
            ))
        })
    }
}

/// `HTTP/1.1 200 OK` => 200.
fn parse_status_line(line: &str) -> Option<u16> {
    let mut fields = line.split_whitespace();
    if !fields.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = fields.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// Sends a channel close when an operation ends without the server having closed the channel
/// (timeout, caller cancelled, early error): otherwise the server-side session would stay open
/// and count against MaxSessions for the life of the connection.
struct CloseOnDrop {
    writer: Option<ChannelWriteHalf<Msg>>,
    /// Signal to send to an abandoned command first: OpenSSH keeps a session (and its
    /// MaxSessions slot) alive until the command exits, whatever the client closed.
    terminate: Option<Sig>,
    /// Atomic only so `closed` works while a stdin feed still borrows the writer.
    open: AtomicBool,
}

impl CloseOnDrop {
    fn new(writer: ChannelWriteHalf<Msg>, terminate: Option<Sig>) -> Self {
        CloseOnDrop {
            writer: Some(writer),
            terminate,
            open: AtomicBool::new(true),
        }
    }

    fn writer(&self) -> &ChannelWriteHalf<Msg> {
        self.writer
            .as_ref()
            .unwrap_or_else(|| unreachable!("writer is only taken on drop"))
    }

    fn closed(&self) {
        self.open.store(false, Ordering::Relaxed);
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if !self.open.load(Ordering::Relaxed) {
            return;
        }
        if let (Some(writer), Ok(runtime)) =
            (self.writer.take(), tokio::runtime::Handle::try_current())
        {
            let terminate = self.terminate.take();
            runtime.spawn(async move {
                if let Some(signal) = terminate {
                    let _ = writer.signal(signal).await;
                }
                let _ = writer.close().await;
            });
        }
    }
}

#[async_trait]
impl Transport for SshTransport {
    async fn exec(
        &self,
        command: &str,
        stdin: Option<Bytes>,
        deadline: Duration,
    ) -> Result<ExecOutput, TransportError> {
        let until = Instant::now() + deadline;
        match timeout_at(until, self.exec_inner(command, stdin, until)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout(deadline)),
        }
    }

    async fn http_get(
        &self,
        address: &str,
        port: u16,
        path: &str,
        deadline: Duration,
    ) -> Result<u16, TransportError> {
        let until = Instant::now() + deadline;
        match timeout_at(until, self.http_get_inner(address, port, path, until)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout(deadline)),
        }
    }

    async fn close(&self) {
        // Closing the semaphore makes every later call fail fast with `Disconnected`.
        self.channels.close();
        let goodbye = self
            .handle
            .disconnect(Disconnect::ByApplication, "roller done", "en");
        if tokio::time::timeout(CLOSE_DEADLINE, goodbye).await.is_err() {
            tracing::debug!(host = %self.name, "no goodbye within {CLOSE_DEADLINE:?}; dropping the connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(
            parse_status_line("HTTP/1.0 503 Service Unavailable"),
            Some(503)
        );
        assert_eq!(parse_status_line("HTTP/1.1 404"), Some(404));
        assert_eq!(parse_status_line("SSH-2.0-OpenSSH_9.2"), None);
        assert_eq!(parse_status_line("HTTP/1.1 20 OK"), None);
        assert_eq!(parse_status_line(""), None);
    }
}
