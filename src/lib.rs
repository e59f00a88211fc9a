//! roller: zero-downtime rollouts of a JVM service across a fleet over SSH.
//!
//! The pipeline is inventory → validated [`inventory::Inventory`] → [`plan::Plan`] (pure data)
//! → [`executor::Executor`] over a [`transport::Transport`] → [`report`] events and a final
//! report. Only the executor and the transports perform I/O on hosts.
//!
//! Around it, [`commands`] holds one use case per command of the binary, each run under a
//! [`session`] (connections, the deploy lock, interrupts) after [`reconcile`] has decided what an
//! earlier rollout leaves to do.

pub mod balancer;
pub mod canary;
pub mod commands;
pub mod discovery;
pub mod error;
pub mod executor;
pub mod health;
pub mod history;
pub mod hooks;
pub mod inventory;
pub mod journal;
pub mod lock;
pub mod plan;
pub mod reconcile;
pub mod remote;
pub mod report;
pub mod selection;
pub mod session;
pub mod transport;

pub use error::{Error, Result};
