//! The inter-VM channel: the patent's shared memory and event channels.
//!
//! ```text
//!  client side (front-end)                          P2P service (back-end)
//!  app ⇄ Unix socket ⇄ ChannelStream ─┐          ┌─ ChannelStream ⇄ ApiService
//!                           driver pump ⇄ region ⇄ device pump
//!                                 │  virtio split virtqueues │
//!                                 └── event channels ────────┘
//! ```
//!
//! One shared region (a sealed memfd here; a PCI BAR in the VM backend) holds a
//! header, two virtio split virtqueues and their buffers ([`layout`], and
//! `docs/channel.md`). The front-end is the virtio *driver* ([`driver`], our
//! code); the back-end is the *device* and uses rust-vmm's `virtio-queue`
//! ([`device`]). Event channels ([`event`]) carry doorbells both ways.
//! Over the queues, [`mux`] multiplexes sessions — one per app connection —
//! with per-session credit flow control and round-robin fairness; each session
//! is a plain `AsyncRead + AsyncWrite` byte stream ([`ChannelStream`]), so the
//! API's frames ride it unchanged.
//!
//! The back-end treats the region as hostile: every index, length, offset and
//! chain is validated, and any violation resets the channel (never the
//! process). [`broker`] hands the region and doorbells to both sides; inside
//! VMs, [`pci`] finds them on the channel device instead.

#![forbid(unsafe_code)]

mod answer;
pub mod broker;
mod device;
mod driver;
pub mod event;
#[doc(hidden)]
pub mod fuzzing;
pub mod layout;
mod mux;
pub mod pci;
pub mod region;
mod session;
pub mod source;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use broker::{Broker, Endpoint, Grant, Side, attach, receive};
pub use event::{EventChannel, EventFdChannel};
pub use layout::Layout;
pub use mux::{
    DEVICE_WINDOW, DRIVER_WINDOW, LinkState, MAX_SESSIONS, PumpCounts, PumpStats, Violation,
};
pub use region::Region;
pub use session::{ChannelReader, ChannelStream, ChannelWriter};
pub use source::{Events, Source, connect};

use device::DeviceLink;
use driver::DriverLink;
use mux::{Pump, Role};
use session::{Session, Wants};

/// Why a channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Sizes or header that do not describe a valid layout.
    #[error("channel layout: {0}")]
    Layout(String),
    /// The region could not be mapped.
    #[error("mapping the channel region")]
    Map(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Getting the region or doorbells from the supervisor failed.
    #[error("{0}")]
    Broker(String),
    /// The channel device of a VM could not be found, bound or opened.
    #[error("channel device {0}")]
    Device(String),
    /// An OS call failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The back-end's pump. Run it; sessions arrive on the [`Acceptor`].
#[derive(Debug)]
pub struct DevicePump<E: EventChannel>(Pump<DeviceLink, E>);

impl<E: EventChannel> DevicePump<E> {
    /// What the pump does, counted as it runs.
    pub fn stats(&self) -> Arc<PumpStats> {
        self.0.stats()
    }

    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        self.0.run(shutdown).await
    }
}

/// The front-end's pump. Run it; open sessions with the [`Connector`].
#[derive(Debug)]
pub struct DriverPump<E: EventChannel>(Pump<DriverLink, E>);

impl<E: EventChannel> DriverPump<E> {
    /// What the pump does, counted as it runs.
    pub fn stats(&self) -> Arc<PumpStats> {
        self.0.stats()
    }

    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        self.0.run(shutdown).await
    }
}

/// Sessions the front-end opened, as the back-end receives them.
#[derive(Debug)]
pub struct Acceptor {
    rx: mpsc::Receiver<ChannelStream>,
    state: watch::Receiver<LinkState>,
}

impl Acceptor {
    /// The next session; `None` once the pump has stopped.
    pub async fn accept(&mut self) -> Option<ChannelStream> {
        self.rx.recv().await
    }

    /// The link state, to watch.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }
}

/// Opens sessions to the back-end.
#[derive(Debug, Clone)]
pub struct Connector {
    wants: Arc<Wants>,
    next: Arc<AtomicU32>,
    state: watch::Receiver<LinkState>,
}

impl Connector {
    /// A new session. It opens as soon as the channel is attached; until then
    /// writes are buffered (up to the session's limit) and reads wait.
    pub fn open(&self) -> ChannelStream {
        let id = loop {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                break id;
            }
        };
        let s = Session::new(id, DRIVER_WINDOW, DEVICE_WINDOW, self.wants.clone(), false);
        s.schedule(&mut s.lock());
        ChannelStream::new(s)
    }

    /// The link state, to watch.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }
}

fn down0() -> LinkState {
    LinkState::Down {
        reason: String::new(),
        resets: 0,
    }
}

/// The back-end of the channel in `region`.
pub fn device<E: EventChannel>(region: Region, events: E) -> (DevicePump<E>, Acceptor) {
    // Every queued session is also a live one, so the pump's session limit
    // bounds this queue; the bound says so in the type.
    let (tx, rx) = mpsc::channel(mux::MAX_SESSIONS);
    let (state_tx, state) = watch::channel(down0());
    let link = DeviceLink::start(region);
    let pump = Pump::new(
        Role::Device,
        link,
        events,
        Arc::default(),
        Some(tx),
        state_tx,
    );
    (DevicePump(pump), Acceptor { rx, state })
}

/// The front-end of the channel in `region`.
pub fn driver<E: EventChannel>(region: Region, events: E) -> (DriverPump<E>, Connector) {
    let (state_tx, state) = watch::channel(down0());
    let wants: Arc<Wants> = Arc::default();
    let link = DriverLink::start(region);
    let pump = Pump::new(Role::Driver, link, events, wants.clone(), None, state_tx);
    (
        DriverPump(pump),
        Connector {
            wants,
            next: Arc::new(AtomicU32::new(1)),
            state,
        },
    )
}
