//! [`Client`]: one authenticated session with the node, and the few helpers
//! every request method is written with.
//!
//! The methods themselves live with their domain:
//!
//! - [`builder`]: [`ClientBuilder`], the environment it reads, connecting.
//! - [`peers`]: the node itself, its peers, connecting and finding them.
//! - [`dht`]: records and providers in the DHT.
//! - [`pubsub`]: topics: subscribing, publishing, who is listening.
//! - [`protocols`]: app-defined protocols and the streams they carry.
//! - [`content`]: publishing, fetching, searching and managing content.
//! - [`credit`]: the credit ledger's view of peers (admin).
//! - [`compute`]: leasing compute: offers (admin), jobs, receipts, balance.
//! - [`services`]: advertising and finding named services.
//! - [`session`]: this session's state and the node's events.
//! - [`admin`]: app tokens and every session on the node (admin).
//!
//! Each method builds its request and names the response variant it expects;
//! [`Client::call`] does the rest, so an answer of the wrong type is handled
//! in one place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;
use tokio::sync::mpsc;

use crate::conn::{DELIVERY_QUEUE, Inner, Registrations};
use crate::error::{Error, Result};
use crate::stream::AppStream;
use tokio_stream_shim::ReceiverStream;

/// The extractor [`Client::call`] takes for the response variant `$variant`:
/// its payload, or `None` for any other variant.
///
/// A macro because a variant's constructor cannot be turned around into its
/// pattern; defined before the modules below so that they can use it.
macro_rules! reply {
    ($variant:ident) => {
        |r: $crate::proto::response::Result| match r {
            $crate::proto::response::Result::$variant(v) => Some(v),
            _ => None,
        }
    };
}

mod admin;
mod builder;
mod compute;
mod content;
mod credit;
mod dht;
mod groups;
mod peers;
mod protocols;
mod pubsub;
mod services;
mod session;
mod tokio_stream_shim;

pub use builder::{ClientBuilder, ENV_SOCKET, ENV_TOKEN, ENV_TOKEN_FILE, default_socket_path};
pub use compute::compute_job_ended;

/// Ends the connection task when the last clone of the client goes.
#[derive(Debug)]
struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A session with the node. Cheap to clone; all clones share the session.
///
/// Requests fail with [`Error::Disconnected`] while the node is away; the client
/// reconnects in the background and re-registers its subscriptions, protocols,
/// services and event watch, so streams of messages simply resume.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _task: Arc<TaskGuard>,
}

fn unexpected() -> Error {
    Error::Protocol("response of the wrong type".into())
}

impl Client {
    /// A builder with defaults from the environment.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Connects with all defaults from the environment.
    pub async fn connect_default() -> Result<Self> {
        Self::builder().connect().await
    }

    /// What the node said when this session (or the latest reconnection) began.
    pub fn welcome(&self) -> pb::Welcome {
        self.inner.welcome.lock().expect("lock").clone()
    }

    /// Waits until the client is connected again after a loss (or returns at once).
    pub async fn wait_connected(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.inner.sender().is_err() {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Disconnected);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Sends `op` and keeps the answer `pick` (see [`reply!`]) recognises.
    ///
    /// The node's error answers have already become [`Error::Api`] in
    /// `Inner::request`; any other variant than the expected one means the
    /// two sides disagree about the protocol.
    async fn call<T>(&self, op: Op, pick: impl FnOnce(R) -> Option<T>) -> Result<T> {
        pick(self.inner.request(op).await?).ok_or_else(unexpected)
    }

    /// [`Client::call`] for the requests whose answer carries nothing.
    async fn ok(&self, op: Op) -> Result<()> {
        self.call(op, reply!(Ok)).await.map(|_: pb::Empty| ())
    }

    /// Records a delivery queue under `name` (so it survives reconnection), then
    /// asks the node; undoes the record if the node refuses.
    async fn register<T>(
        &self,
        pick: fn(&mut Registrations) -> &mut HashMap<String, mpsc::Sender<T>>,
        name: &str,
        op: Op,
    ) -> Result<ReceiverStream<T>> {
        let (tx, rx) = mpsc::channel(DELIVERY_QUEUE);
        {
            let mut regs = self.inner.regs.lock().expect("lock");
            let map = pick(&mut regs);
            if map.contains_key(name) {
                // Replacing the entry would silently end the first stream.
                return Err(Error::Api {
                    code: pb::ErrorCode::AlreadyExists,
                    message: format!("{name} is already registered by this client"),
                });
            }
            map.insert(name.into(), tx);
        }
        if let Err(e) = self.ok(op).await {
            pick(&mut self.inner.regs.lock().expect("lock")).remove(name);
            return Err(e);
        }
        Ok(ReceiverStream::new(rx))
    }

    /// The stream the connection task created when the node's answer named
    /// it; gone only if the session dropped in between.
    fn take_opened(&self, stream_id: u64) -> Result<AppStream> {
        self.inner
            .opened
            .lock()
            .expect("lock")
            .remove(&stream_id)
            .ok_or(Error::Disconnected)
    }
}

#[cfg(test)]
mod tests;
