//! Handing the region and the event channels to the two sides.
//!
//! The supervisor owns the memfd and two eventfds (one per direction) for the
//! life of `p2pvmm up`, and answers on a private Unix socket: a side connects,
//! says which side it is (one byte), and receives three descriptors with
//! `SCM_RIGHTS`: the region, the eventfd it waits on, and the eventfd it rings.
//! A restarted side simply connects again and gets the same channel. In the VM
//! backend the VMM maps the same region into both guests instead.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::ChannelError;
use crate::event::{EventFdChannel, eventfd};
use crate::layout::Layout;
use crate::region::Region;

/// Which end of the channel a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The back-end (P2P service).
    Device,
    /// The front-end (client side).
    Driver,
}

impl Side {
    fn byte(self) -> u8 {
        match self {
            Side::Device => b'D',
            Side::Driver => b'F',
        }
    }
}

/// The supervisor's channel: region plus both doorbells.
#[derive(Debug)]
pub struct Broker {
    region: Region,
    /// The device waits on this one; the driver rings it.
    device_bell: OwnedFd,
    /// The driver waits on this one; the device rings it.
    driver_bell: OwnedFd,
}

impl Broker {
    /// Creates a fresh region and event channels.
    pub fn new(layout: Layout) -> Result<Self, ChannelError> {
        Ok(Self {
            region: Region::create(layout)?,
            device_bell: eventfd()?,
            driver_bell: eventfd()?,
        })
    }

    /// The region (the supervisor itself never touches its contents).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The three descriptors for `side`: region, ours, peer's.
    fn fds(&self, side: Side) -> [BorrowedFd<'_>; 3] {
        let (ours, peer) = match side {
            Side::Device => (&self.device_bell, &self.driver_bell),
            Side::Driver => (&self.driver_bell, &self.device_bell),
        };
        [self.region.file().as_fd(), ours.as_fd(), peer.as_fd()]
    }

    /// Answers one connection: reads the side byte, sends the descriptors.
    pub fn answer(&self, mut conn: UnixStream) -> io::Result<Side> {
        let mut b = [0u8; 1];
        conn.read_exact(&mut b)?;
        let side = match b[0] {
            b'D' => Side::Device,
            b'F' => Side::Driver,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown side byte {other:#x}"),
                ));
            }
        };
        let fds = self.fds(side);
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        anc.push(SendAncillaryMessage::ScmRights(&fds));
        rustix::net::sendmsg(
            &conn,
            &[io::IoSlice::new(&[side.byte()])],
            &mut anc,
            SendFlags::empty(),
        )?;
        conn.flush()?;
        Ok(side)
    }
}

/// What a side receives from the broker.
#[derive(Debug)]
pub struct Endpoint {
    /// The shared region, mapped.
    pub region: Region,
    /// Eventfd we wait on.
    pub ours: OwnedFd,
    /// Eventfd we ring.
    pub peer: OwnedFd,
}

impl Endpoint {
    /// The event channel over the two eventfds (needs a tokio runtime).
    pub fn events(&self) -> io::Result<EventFdChannel> {
        EventFdChannel::new(self.ours.try_clone()?, self.peer.try_clone()?)
    }
}

/// The descriptors the broker hands a side, unmapped: what a VMM takes to
/// wire the channel device of its VM (it maps the region into the guest and
/// never reads it itself).
#[derive(Debug)]
pub struct Grant {
    /// The region's sealed memfd.
    pub region: File,
    /// Eventfd this side is rung on.
    pub ours: OwnedFd,
    /// Eventfd that rings the other side.
    pub peer: OwnedFd,
}

/// Connects to the broker socket at `path` as `side` and maps the region.
pub fn attach(path: &Path, side: Side) -> Result<Endpoint, ChannelError> {
    let g = receive(path, side)?;
    Ok(Endpoint {
        region: Region::open(g.region)?,
        ours: g.ours,
        peer: g.peer,
    })
}

/// Connects to the broker socket at `path` as `side` and takes its
/// descriptors, leaving the region unmapped.
pub fn receive(path: &Path, side: Side) -> Result<Grant, ChannelError> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        ChannelError::Broker(format!(
            "cannot reach the channel broker at {}: {e}",
            path.display()
        ))
    })?;
    conn.write_all(&[side.byte()])?;
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let mut b = [0u8; 1];
    let got = rustix::net::recvmsg(
        &conn,
        &mut [io::IoSliceMut::new(&mut b)],
        &mut anc,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    if got.bytes != 1 || b[0] != side.byte() {
        return Err(ChannelError::Broker("the broker refused this side".into()));
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    for msg in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    let [region, ours, peer]: [OwnedFd; 3] = fds.try_into().map_err(|v: Vec<OwnedFd>| {
        ChannelError::Broker(format!("expected 3 descriptors, got {}", v.len()))
    })?;
    let region = File::from(region);
    let seals = rustix::fs::fcntl_get_seals(&region).map_err(io::Error::from)?;
    if !seals.contains(rustix::fs::SealFlags::SHRINK) {
        return Err(ChannelError::Layout(
            "the region is not sealed against shrinking".into(),
        ));
    }
    Ok(Grant { region, ours, peer })
}
