//! `guest-api`: the crate applications link against to use the machine's one
//! shared P2P node.
//!
//! ```text
//!  your app ── guest_api::Client ──► Unix socket ──► p2pd (host mode)
//!                                         └──────► guest-frontend ─► channel ─► service VM
//! ```
//!
//! The same API works in host mode and from the client VM: only the socket
//! path differs. Every session authenticates with a per-app token issued by the
//! node operator (`p2pctl app issue NAME`); an app sees and controls only what it
//! created. Start with [`Client::builder`].
//!
//! ```no_run
//! # async fn f() -> guest_api::Result<()> {
//! use futures::StreamExt;
//! let client = guest_api::Client::builder().name("chat").connect().await?;
//! let mut msgs = client.subscribe("lobby").await?;
//! client.publish("lobby", "hi all").await?;
//! if let Some(m) = msgs.next().await {
//!     println!("{}", String::from_utf8_lossy(&m.data));
//! }
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod client;
mod conn;
mod content;
mod error;
mod stream;

pub use client::{
    Client, ClientBuilder, ENV_SOCKET, ENV_TOKEN, ENV_TOKEN_FILE, compute_job_ended,
    default_socket_path,
};
pub use conn::Message;
pub use content::ContentReader;
pub use error::{Error, Result};
pub use p2pvm_proto::pb as proto;
pub use stream::AppStream;
