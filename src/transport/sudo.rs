//! A session whose commands run as root through sudo, for the side of the fleet whose inventory
//! says `sudo = true`: the one place where that side's commands are wrapped, so that every one
//! of them (plan steps, the deploy lock and its fence, the rollout state, canary decisions) goes
//! through it, and the probe that asks sudo before anything changes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ExecOutput, Transport, TransportError};
use crate::remote::sudo::{self, Refusal};

/// How long the probe may take: sudo answers at once or not at all.
const PROBE_DEADLINE: Duration = Duration::from_secs(30);

/// Sends every command through [`sudo::wrap`]. HTTP checks pass through unchanged: they change
/// nothing and need no privilege.
pub struct AsRoot {
    inner: Arc<dyn Transport>,
}

impl AsRoot {
    pub fn new(inner: Arc<dyn Transport>) -> AsRoot {
        AsRoot { inner }
    }
}

#[async_trait]
impl Transport for AsRoot {
    async fn exec(
        &self,
        command: &str,
        stdin: Option<Bytes>,
        deadline: Duration,
    ) -> Result<ExecOutput, TransportError> {
        self.inner.exec(&sudo::wrap(command), stdin, deadline).await
    }

    async fn http_get(
        &self,
        address: &str,
        port: u16,
        path: &str,
        deadline: Duration,
    ) -> Result<u16, TransportError> {
        self.inner.http_get(address, port, path, deadline).await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

/// What sudo answered the probe with, when it did not run it as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub refusal: Refusal,
    /// What sudo printed, control characters escaped.
    pub stderr: String,
}

/// Asks sudo on `session` (the SSH user's own, not wrapped) to run a command as root the way
/// every command will be sent, changing nothing. `Ok(Err(_))` is sudo's refusal; `Err(_)` a
/// session that failed.
pub async fn probe(session: &dyn Transport) -> Result<Result<(), Refused>, TransportError> {
    let out = session.exec(&sudo::probe(), None, PROBE_DEADLINE).await?;
    let stdout = out.stdout_text();
    if out.success() && stdout.trim() == sudo::PROBE_ROOT {
        return Ok(Ok(()));
    }
    let stderr = out.stderr_text();
    let refusal = if out.success() {
        Refusal::NotRoot
    } else {
        Refusal::read(out.status, &stderr)
    };
    Ok(Err(Refused { refusal, stderr }))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Answers every command with one reply, and keeps what it was sent.
    struct Host {
        reply: ExecOutput,
        sent: Mutex<Vec<String>>,
    }

    impl Host {
        fn answering(status: u32, stdout: &str, stderr: &str) -> Arc<Host> {
            Arc::new(Host {
                reply: ExecOutput {
                    status: Some(status),
                    stdout: stdout.as_bytes().to_vec(),
                    stderr: stderr.as_bytes().to_vec(),
                },
                sent: Mutex::new(Vec::new()),
            })
        }
    }

    #[async_trait]
    impl Transport for Host {
        async fn exec(
            &self,
            command: &str,
            _: Option<Bytes>,
            _: Duration,
        ) -> Result<ExecOutput, TransportError> {
            self.sent.lock().unwrap().push(command.to_string());
            Ok(self.reply.clone())
        }

        async fn http_get(
            &self,
            _: &str,
            _: u16,
            _: &str,
            _: Duration,
        ) -> Result<u16, TransportError> {
            Ok(200)
        }

        async fn close(&self) {}
    }

    #[tokio::test]
    async fn every_command_goes_through_the_wrapper_and_the_probe_wants_uid_0() {
        let host = Host::answering(0, "0\n", "sudo: unable to resolve host web-1\n");
        let as_root = AsRoot::new(host.clone());
        as_root
            .exec("mv -T a b", None, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            host.sent.lock().unwrap().as_slice(),
            ["sudo -n /bin/sh -c 'mv -T a b'"]
        );
        // A warning on stderr does not matter: sudo ran it, as root.
        assert_eq!(probe(host.as_ref()).await, Ok(Ok(())));
        assert_eq!(
            host.sent.lock().unwrap().last().unwrap(),
            "LC_ALL=C sudo -n /bin/sh -c 'id -u'"
        );

        let not_root = Host::answering(0, "1000\n", "");
        let refused = probe(not_root.as_ref()).await.unwrap().unwrap_err();
        assert_eq!(refused.refusal, Refusal::NotRoot);

        let password = Host::answering(1, "", "sudo: a password is required\n");
        let refused = probe(password.as_ref()).await.unwrap().unwrap_err();
        assert_eq!(
            refused,
            Refused {
                refusal: Refusal::PasswordRequired,
                stderr: "sudo: a password is required".into()
            }
        );
    }
}
