//! SSH transport over russh: one multiplexed, strictly host-key-checked connection per host.
//!
//! The shape follows what OpenSSH servers allow by default: MaxStartups drops surplus
//! unauthenticated connections (so connects are capped globally and retried), MaxSessions caps
//! session channels per connection (so channels are capped per host and refused opens are
//! retried), and a command that stops reading stdin must never wedge an upload (so writing and
//! reading a channel always run side by side under the caller's deadline).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use russh::Channel;
use russh::client::{self, ChannelOpenHandle, Msg};
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelOpenFailure, ChannelWriteHalf, Disconnect, Sig};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::{Instant, sleep, timeout_at};

use super::{Connector, Endpoint, ExecOutput, Transport, TransportError};

/// Below OpenSSH's default MaxSessions (10): channels that we consider closed can still count
/// on the server until it has processed our close, so a little headroom avoids refusals.
pub const DEFAULT_MAX_CHANNELS_PER_HOST: usize = 8;
/// Below the start (10) of OpenSSH's default MaxStartups 10:30:100, past which sshd randomly
/// drops new unauthenticated connections.
pub const DEFAULT_MAX_CONCURRENT_CONNECTS: usize = 8;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Detects a dead peer on an otherwise idle connection between rollout steps.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_MAX: usize = 3;
/// AES-GCM first: with AES-NI it uploaded a 100 MiB jar ~40% faster than russh's default
/// chacha20-poly1305 on our test machine; the others remain for servers without it.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_128_CTR,
];
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
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

/// How to reach and authenticate to every host of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSettings {
    pub user: String,
    /// Private key file; `None` uses the ssh-agent at `SSH_AUTH_SOCK`.
    pub identity: Option<PathBuf>,
    /// Checked strictly: an unknown host is refused, a changed key is refused loudly.
    pub known_hosts: PathBuf,
    /// Bounds TCP connect, key exchange and authentication together, retries included.
    pub connect_timeout: Duration,
    pub max_channels_per_host: usize,
    pub max_concurrent_connects: usize,
    /// Accept `ssh-rsa` host-key signatures, which use SHA-1; off unless the inventory opts in
    /// (`ssh.allow_sha1_rsa`), as in OpenSSH since 8.8.
    pub allow_sha1_rsa: bool,
}

impl SshSettings {
    /// Settings with the default timeout and limits.
    pub fn new(user: impl Into<String>, identity: Option<PathBuf>, known_hosts: PathBuf) -> Self {
        SshSettings {
            user: user.into(),
            identity,
            known_hosts,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_channels_per_host: DEFAULT_MAX_CHANNELS_PER_HOST,
            max_concurrent_connects: DEFAULT_MAX_CONCURRENT_CONNECTS,
            allow_sha1_rsa: false,
        }
    }
}

#[derive(Clone)]
enum Credentials {
    Key { path: PathBuf, key: Arc<PrivateKey> },
    Agent,
}

/// Opens [`SshTransport`]s. Shared by all hosts of a rollout so that the connect cap is global.
pub struct SshConnector {
    settings: SshSettings,
    credentials: Credentials,
    config: Arc<client::Config>,
    connect_gate: Arc<Semaphore>,
}

impl std::fmt::Debug for SshConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshConnector")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl SshConnector {
    /// Loads the identity up front, so a bad key path fails the rollout before any host is
    /// touched rather than once per host.
    pub fn new(settings: SshSettings) -> Result<Self, TransportError> {
        let credentials = match &settings.identity {
            Some(path) => Credentials::Key {
                path: path.clone(),
                key: Arc::new(load_identity(&settings.user, path)?),
            },
            None => {
                if std::env::var_os("SSH_AUTH_SOCK").is_none() {
                    return Err(TransportError::Auth {
                        user: settings.user.clone(),
                        detail:
                            "no identity file given and SSH_AUTH_SOCK is not set (no ssh-agent)"
                                .into(),
                    });
                }
                Credentials::Agent
            }
        };
        let config = client::Config {
            // Without it every small request/response exchange stalls ~40 ms on delayed ACKs.
            nodelay: true,
            keepalive_interval: Some(KEEPALIVE_INTERVAL),
            keepalive_max: KEEPALIVE_MAX,
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Borrowed(CIPHERS),
                key: host_key_algorithms(settings.allow_sha1_rsa).into(),
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(SshConnector {
            connect_gate: Arc::new(Semaphore::new(settings.max_concurrent_connects.max(1))),
            settings,
            credentials,
            config: Arc::new(config),
        })
    }

    pub fn settings(&self) -> &SshSettings {
        &self.settings
    }

    /// One TCP connect + key exchange + authentication.
    async fn attempt(&self, endpoint: &Endpoint) -> Result<SshTransport, Attempt> {
        let verdict = Arc::new(Mutex::new(None));
        let policy = HostKeyPolicy {
            host: endpoint.address.clone(),
            port: endpoint.port,
            known_hosts: self.settings.known_hosts.clone(),
            verdict: verdict.clone(),
        };
        let connected = client::connect(
            self.config.clone(),
            (endpoint.address.as_str(), endpoint.port),
            policy,
        )
        .await;
        let mut handle = match connected {
            Ok(handle) => handle,
            Err(e) => {
                // russh reports a refused key as its own generic error; the policy knows why.
                if let Some(refusal) = take_verdict(&verdict) {
                    return Err(Attempt::Fatal(refusal));
                }
                return Err(classify_connect_error(endpoint, e));
            }
        };
        self.authenticate(&mut handle, endpoint).await?;
        Ok(SshTransport {
            name: endpoint.name.clone(),
            handle: Arc::new(handle),
            channels: Semaphore::new(self.settings.max_channels_per_host.max(1)),
        })
    }

    async fn authenticate(
        &self,
        handle: &mut client::Handle<HostKeyPolicy>,
        endpoint: &Endpoint,
    ) -> Result<(), Attempt> {
        let user = endpoint
            .user
            .clone()
            .unwrap_or_else(|| self.settings.user.clone());
        let auth_error = |detail: String| {
            Attempt::Fatal(TransportError::Auth {
                user: user.clone(),
                detail: format!("{}: {detail}", endpoint.name),
            })
        };
        match &self.credentials {
            Credentials::Key { path, key } => {
                let hash = if key.algorithm().is_rsa() {
                    rsa_hash(handle).await
                } else {
                    None
                };
                let result = handle
                    .authenticate_publickey(
                        user.clone(),
                        PrivateKeyWithHashAlg::new(key.clone(), hash),
                    )
                    .await
                    .map_err(|e| classify_connect_error(endpoint, e))?;
                if result.success() {
                    Ok(())
                } else {
                    Err(auth_error(format!(
                        "server rejected key {} ({})",
                        path.display(),
                        key.public_key().fingerprint(HashAlg::Sha256)
                    )))
                }
            }
            Credentials::Agent => {
                let mut agent = AgentClient::connect_env()
                    .await
                    .map_err(|e| auth_error(format!("cannot reach ssh-agent: {e}")))?;
                if let Some(binding) = handle.agent_session_binding() {
                    // Only needed for destination-constrained keys; older agents reject it.
                    let _ = agent.bind_session(binding, false).await;
                }
                let identities = agent
                    .request_identities()
                    .await
                    .map_err(|e| auth_error(format!("ssh-agent: {e}")))?;
                if identities.is_empty() {
                    return Err(auth_error("ssh-agent holds no identities".into()));
                }
                let mut tried = Vec::new();
                for identity in identities {
                    let key: PublicKey = match &identity {
                        AgentIdentity::PublicKey { key, .. } => key.clone(),
                        AgentIdentity::Certificate { .. } => continue,
                    };
                    let hash = if key.algorithm().is_rsa() {
                        rsa_hash(handle).await
                    } else {
                        None
                    };
                    tried.push(key.fingerprint(HashAlg::Sha256).to_string());
                    match handle
                        .authenticate_publickey_with(user.clone(), key, hash, &mut agent)
                        .await
                    {
                        Ok(result) if result.success() => return Ok(()),
                        Ok(_) => {}
                        Err(russh::AgentAuthError::Send(_)) => {
                            return Err(Attempt::Transient(format!(
                                "connection to {} lost during authentication",
                                endpoint.name
                            )));
                        }
                        // The agent declined this key; the next one may still work.
                        Err(russh::AgentAuthError::Key(_)) => {}
                    }
                }
                Err(auth_error(format!(
                    "server rejected every ssh-agent key ({})",
                    tried.join(", ")
                )))
            }
        }
    }
}

#[async_trait]
impl Connector for SshConnector {
    async fn connect(&self, endpoint: &Endpoint) -> Result<Arc<dyn Transport>, TransportError> {
        // Held until authenticated: MaxStartups counts exactly the unauthenticated connections.
        let _permit = self
            .connect_gate
            .acquire()
            .await
            .map_err(|_| TransportError::Connect("connector closed".into()))?;
        // The deadline starts after the permit: queueing behind other hosts is not this host's fault.
        let limit = self.settings.connect_timeout;
        let deadline = Instant::now() + limit;
        let mut backoff = Backoff::new();
        let mut last_transient: Option<String> = None;
        loop {
            let failure = match timeout_at(deadline, self.attempt(endpoint)).await {
                Ok(Ok(transport)) => {
                    tracing::debug!(host = %endpoint.name, "ssh connected");
                    return Ok(Arc::new(transport));
                }
                Ok(Err(Attempt::Fatal(e))) => return Err(e),
                Ok(Err(Attempt::Transient(e))) => e,
                Err(_) => {
                    return Err(match last_transient {
                        Some(last) => TransportError::Connect(format!(
                            "{last} (still failing after {limit:?})"
                        )),
                        None => TransportError::Timeout(limit),
                    });
                }
            };
            tracing::debug!(host = %endpoint.name, error = %failure, "ssh connect failed, retrying");
            let pause = backoff.next();
            if Instant::now() + pause >= deadline {
                return Err(TransportError::Connect(format!(
                    "{failure} (still failing after {limit:?})"
                )));
            }
            last_transient = Some(failure);
            sleep(pause).await;
        }
    }
}

/// Outcome of one failed connect attempt: retry or give up.
enum Attempt {
    Transient(String),
    Fatal(TransportError),
}

fn classify_connect_error(endpoint: &Endpoint, e: russh::Error) -> Attempt {
    use std::io::ErrorKind;
    let what = format!("{} ({}:{})", endpoint.name, endpoint.address, endpoint.port);
    match &e {
        // What sshd's MaxStartups (and a restarting sshd) looks like from here: the TCP
        // connection is accepted and then dropped before or during the handshake.
        russh::Error::IO(io)
            if matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::BrokenPipe
            ) =>
        {
            Attempt::Transient(format!("{what}: {e}"))
        }
        russh::Error::Disconnect | russh::Error::HUP | russh::Error::SendError => {
            Attempt::Transient(format!(
                "{what}: connection closed by server during handshake"
            ))
        }
        _ => Attempt::Fatal(TransportError::Connect(format!("{what}: {e}"))),
    }
}

/// RSA keys sign with whichever hash the server advertises, best first; ssh-rsa (SHA-1) only
/// when the server says nothing else.
async fn rsa_hash(handle: &client::Handle<HostKeyPolicy>) -> Option<HashAlg> {
    match handle.best_supported_rsa_hash().await {
        Ok(Some(hash)) => hash,
        // No server-sig-algs extension: modern servers all accept SHA-256.
        Ok(None) | Err(_) => Some(HashAlg::Sha256),
    }
}

fn load_identity(user: &str, path: &Path) -> Result<PrivateKey, TransportError> {
    let fail = |detail: String| TransportError::Auth {
        user: user.to_string(),
        detail: format!("identity file {}: {detail}", path.display()),
    };
    // Read first so that a missing file says so, instead of a generic key-parsing error.
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    russh::keys::decode_secret_key(&text, None).map_err(|e| match e {
        russh::keys::Error::KeyIsEncrypted => fail(
            "the key is passphrase-protected; load it into ssh-agent and leave identity unset"
                .into(),
        ),
        other => fail(format!("not a usable private key: {other}")),
    })
}

/// The host-key algorithms offered, best first: russh's defaults, without SHA-1 `ssh-rsa`
/// unless the inventory allows it, as OpenSSH does since 8.8.
fn host_key_algorithms(allow_sha1_rsa: bool) -> Vec<russh::keys::Algorithm> {
    russh::Preferred::DEFAULT
        .key
        .iter()
        .filter(|a| allow_sha1_rsa || **a != russh::keys::Algorithm::Rsa { hash: None })
        .cloned()
        .collect()
}

/// Strict known_hosts policy, run by russh during key exchange.
struct HostKeyPolicy {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    /// Why the key was refused; russh only reports that it was.
    verdict: Arc<Mutex<Option<TransportError>>>,
}

fn take_verdict(verdict: &Mutex<Option<TransportError>>) -> Option<TransportError> {
    verdict.lock().unwrap_or_else(|e| e.into_inner()).take()
}

impl HostKeyPolicy {
    fn host_label(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }

    fn check(&self, key: &PublicKey) -> Result<(), TransportError> {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let known_hosts = self.known_hosts.display().to_string();
        // russh skips lines with markers; OpenSSH refuses a revoked key whatever else lists
        // it, so they are read first.
        let markers = marker_lines(&self.known_hosts);
        if let Some(m) = markers
            .iter()
            .find(|m| m.marker == "@revoked" && m.key.as_ref() == Some(key.key_data()))
        {
            return Err(TransportError::HostKeyRevoked {
                host: self.host_label(),
                fingerprint,
                known_hosts,
                line: m.line,
            });
        }
        let recorded = russh::keys::known_hosts::known_host_keys_path(
            &self.host,
            self.port,
            &self.known_hosts,
        )
        .map_err(|e| {
            TransportError::Connect(format!(
                "cannot check host key of {}: {known_hosts}: {e}",
                self.host_label()
            ))
        })?;
        if recorded.iter().any(|(_, k)| k.key_data() == key.key_data()) {
            return Ok(());
        }
        // Like OpenSSH: a recorded key of another algorithm says nothing about this one, so the
        // host is merely unknown for it; a different key of the same algorithm is a change.
        if let Some((line, _)) = recorded
            .iter()
            .find(|(_, k)| k.algorithm() == key.algorithm())
        {
            return Err(TransportError::HostKeyChanged {
                host: self.host_label(),
                fingerprint,
                line: physical_line(&self.known_hosts, *line),
                known_hosts,
            });
        }
        if let Some(m) = markers.iter().find(|m| m.marker == "@cert-authority") {
            return Err(TransportError::Connect(format!(
                "host key for {} is not in {known_hosts} ({fingerprint}), and roller does not accept host certificates: \
                 the @cert-authority line {} is not used; list the host's own key instead",
                self.host_label(),
                m.line
            )));
        }
        Err(TransportError::HostKeyUnknown {
            host: self.host_label(),
            fingerprint,
            known_hosts,
        })
    }
}

/// A known_hosts line with a marker (`@revoked`, `@cert-authority`).
struct MarkerLine {
    /// 1-based, counting every line as editors do.
    line: usize,
    marker: String,
    /// `None` when the key does not parse: such a line can match no key.
    key: Option<russh::keys::ssh_key::public::KeyData>,
}

fn marker_lines(path: &Path) -> Vec<MarkerLine> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .enumerate()
        .filter_map(|(index, line)| {
            let mut fields = line.split_whitespace();
            let marker = fields.next().filter(|m| m.starts_with('@'))?;
            let _hosts = fields.next();
            let _algorithm = fields.next();
            let key = fields
                .next()
                .and_then(|k| russh::keys::parse_public_key_base64(k).ok())
                .map(|k| k.key_data().clone());
            Some(MarkerLine {
                line: index + 1,
                marker: marker.to_string(),
                key,
            })
        })
        .collect()
}

/// russh numbers known_hosts lines without counting `#` comments; editors and OpenSSH count them.
fn physical_line(path: &Path, russh_line: usize) -> usize {
    let Ok(text) = std::fs::read_to_string(path) else {
        return russh_line;
    };
    let mut counted = 0;
    for (index, line) in text.lines().enumerate() {
        if !line.starts_with('#') {
            counted += 1;
            if counted == russh_line {
                return index + 1;
            }
        }
    }
    russh_line
}

impl client::Handler for HostKeyPolicy {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let outcome = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.check(key),
            // Host certificates are never requested, so one arriving is a misbehaving server.
            PublicKeyOrCertificate::Certificate(_) => Err(TransportError::Connect(format!(
                "{} offered a host certificate, which roller does not accept",
                self.host_label()
            ))),
        };
        match outcome {
            Ok(()) => Ok(true),
            Err(refusal) => {
                tracing::warn!(host = %self.host_label(), error = %refusal, "host key refused");
                *self.verdict.lock().unwrap_or_else(|e| e.into_inner()) = Some(refusal);
                Ok(false)
            }
        }
    }

    // roller opens every channel it uses; one the server opens (agent or X11 forwarding, a
    // forwarded port) is never wanted, and russh would accept it by default.

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "forwarded-tcpip").await
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "forwarded-streamlocal").await
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "agent forwarding").await
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "x11").await
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "session").await
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "direct-tcpip").await
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply, "direct-streamlocal").await
    }
}

async fn refuse_channel(reply: ChannelOpenHandle, kind: &str) -> Result<(), russh::Error> {
    tracing::warn!(
        kind,
        "the server opened a channel roller never asked for; refused"
    );
    reply
        .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
        .await;
    Ok(())
}

/// Exponential backoff with jitter, so hosts refused together do not retry together.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: FIRST_BACKOFF,
        }
    }

    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Up to +50%, from the clock's low bits: good enough to spread retries.
        base + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
    }
}

/// One authenticated connection to one host.
pub struct SshTransport {
    name: String,
    handle: Arc<client::Handle<HostKeyPolicy>>,
    /// Caps open channels below the server's MaxSessions; closed on `close()`.
    channels: Semaphore,
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
            .exec(true, super::posix_sh(command))
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

    #[test]
    fn sha1_rsa_host_keys_only_when_the_inventory_allows_them() {
        use russh::keys::Algorithm;
        let sha1 = Algorithm::Rsa { hash: None };
        let sha512 = Algorithm::Rsa {
            hash: Some(HashAlg::Sha512),
        };
        let strict = host_key_algorithms(false);
        assert!(!strict.contains(&sha1), "{strict:?}");
        assert!(strict.contains(&sha512) && strict.contains(&Algorithm::Ed25519));
        assert!(host_key_algorithms(true).contains(&sha1));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut backoff = Backoff::new();
        let first = backoff.next();
        assert!(first >= FIRST_BACKOFF && first <= FIRST_BACKOFF * 3 / 2);
        for _ in 0..20 {
            assert!(backoff.next() <= MAX_BACKOFF * 3 / 2);
        }
    }

    #[test]
    fn missing_identity_names_the_path() {
        let settings = SshSettings::new(
            "deploy",
            Some(PathBuf::from("/nonexistent/roller/id_ed25519")),
            PathBuf::from("/nonexistent/known_hosts"),
        );
        let err = SshConnector::new(settings).unwrap_err();
        match &err {
            TransportError::Auth { user, detail } => {
                assert_eq!(user, "deploy");
                assert!(
                    detail.contains("/nonexistent/roller/id_ed25519"),
                    "{detail}"
                );
            }
            other => panic!("expected Auth, got {other:?}"),
        }
    }

    #[test]
    fn physical_line_skips_comments_like_openssh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, "# one\nhost-a k1 v\n# two\nhost-b k2 v\n").unwrap();
        assert_eq!(physical_line(&path, 1), 2);
        assert_eq!(physical_line(&path, 2), 4);
    }
}
