//! Where a side finds its channel: from the supervisor's broker (sandbox
//! backend, and the VMMs of the VM backend), or on the channel device of the
//! VM it runs in (VM backend, inside the guests).

use std::io;
use std::path::PathBuf;

use crate::broker::{Side, attach};
use crate::event::{EventChannel, EventFdChannel};
use crate::pci::{self, POSITION_DEVICE, POSITION_DRIVER, RegionMapping, UioEvents};
use crate::{ChannelError, Region};

/// Where the region and the event channels come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The broker socket at this path.
    Broker(PathBuf),
    /// The channel device of this VM (`None`: the first one found).
    Device {
        /// Its sysfs directory, e.g. `/sys/bus/pci/devices/0000:00:03.0`.
        path: Option<PathBuf>,
        /// How to map the region.
        mapping: RegionMapping,
    },
}

impl Source {
    /// `auto` or a sysfs path: the device; anything else: a broker socket.
    pub fn device(spec: &str, mapping: RegionMapping) -> Self {
        Self::Device {
            path: (spec != "auto").then(|| PathBuf::from(spec)),
            mapping,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Broker(p) => write!(f, "broker {}", p.display()),
            Source::Device { path: Some(p), .. } => write!(f, "device {}", p.display()),
            Source::Device { path: None, .. } => write!(f, "this VM's channel device"),
        }
    }
}

/// Either kind of event channel.
#[derive(Debug)]
pub enum Events {
    /// Eventfds from the broker.
    Fd(EventFdChannel),
    /// Doorbell register and uio interrupt.
    Uio(UioEvents),
}

impl EventChannel for Events {
    fn notify(&self) -> io::Result<()> {
        match self {
            Events::Fd(e) => e.notify(),
            Events::Uio(e) => e.notify(),
        }
    }

    async fn wait(&self) -> io::Result<()> {
        match self {
            Events::Fd(e) => e.wait().await,
            Events::Uio(e) => e.wait().await,
        }
    }

    fn poll_for_answers(&self) -> bool {
        match self {
            Events::Fd(e) => e.poll_for_answers(),
            Events::Uio(e) => e.poll_for_answers(),
        }
    }
}

/// Maps the region and opens the event channels for `side`. Blocks (run it
/// off the async threads); needs a tokio runtime context.
pub fn connect(source: &Source, side: Side) -> Result<(Region, Events), ChannelError> {
    match source {
        Source::Broker(path) => {
            let ep = attach(path, side)?;
            let events = ep.events()?;
            Ok((ep.region, Events::Fd(events)))
        }
        Source::Device { path, mapping } => {
            let expected = match side {
                Side::Device => POSITION_DEVICE,
                Side::Driver => POSITION_DRIVER,
            };
            let ch = pci::open(path.as_deref(), *mapping, expected)?;
            tracing::info!(device = %ch.device.display(), ?mapping, "channel device opened");
            Ok((ch.region, Events::Uio(ch.events)))
        }
    }
}
