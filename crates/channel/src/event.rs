//! Event channels: "notify the peer" and "wait until the peer notifies me".
//!
//! In the sandbox backend a channel is a pair of eventfds brokered by the
//! supervisor (one per direction); in the VM backend the same trait is a
//! doorbell register write and a uio interrupt (`crate::pci`). Rings never
//! depend on which.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::event::EventfdFlags;
use tokio::io::unix::AsyncFd;

/// One side's end of the event channels.
pub trait EventChannel: Send + Sync + 'static {
    /// Rings the peer's doorbell. Never blocks.
    fn notify(&self) -> io::Result<()>;
    /// Resolves once the peer has rung ours since the last wait (notifications coalesce).
    fn wait(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Whether a notification costs enough that a side should poll for an
    /// answer it expects soon rather than sleep (`crate::answer`). Between
    /// host processes an eventfd wake-up costs microseconds and polling there
    /// only takes CPU from the host's other work; between VMs a notification
    /// is an exit in one VM and an injected interrupt in the other.
    fn poll_for_answers(&self) -> bool {
        false
    }
}

/// Creates an eventfd suitable for [`EventFdChannel`].
pub fn eventfd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
    )?)
}

/// An event channel over two eventfds: ours (we wait on it) and the peer's.
#[derive(Debug)]
pub struct EventFdChannel {
    peer: OwnedFd,
    ours: AsyncFd<OwnedFd>,
}

impl EventFdChannel {
    /// `ours` is read to wait; `peer` is written to notify. Needs a tokio runtime.
    pub fn new(ours: OwnedFd, peer: OwnedFd) -> io::Result<Self> {
        rustix::io::ioctl_fionbio(&ours, true)?;
        // `new` is deprecated because a `T` that does not own its descriptor
        // could close it while registered; an `OwnedFd` moved in cannot be.
        #[allow(deprecated)]
        let ours = AsyncFd::new(ours)?;
        Ok(Self { peer, ours })
    }
}

impl EventChannel for EventFdChannel {
    fn notify(&self) -> io::Result<()> {
        match rustix::io::write(&self.peer, &1u64.to_ne_bytes()) {
            Ok(_) => Ok(()),
            // The counter is saturated: the peer has plenty of notifications pending.
            Err(rustix::io::Errno::AGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn wait(&self) -> io::Result<()> {
        loop {
            let mut guard = self.ours.readable().await?;
            let mut buf = [0u8; 8];
            match rustix::io::read(self.ours.get_ref().as_fd(), &mut buf) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn notifications_cross_and_coalesce() {
        let (a, b) = (eventfd().unwrap(), eventfd().unwrap());
        let left = EventFdChannel::new(a.try_clone().unwrap(), b.try_clone().unwrap()).unwrap();
        let right = EventFdChannel::new(b, a).unwrap();
        left.notify().unwrap();
        left.notify().unwrap();
        tokio::time::timeout(Duration::from_secs(1), right.wait())
            .await
            .expect("notified")
            .unwrap();
        // Both notifications were consumed by one wait.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), right.wait())
                .await
                .is_err()
        );
        right.notify().unwrap();
        tokio::time::timeout(Duration::from_secs(1), left.wait())
            .await
            .expect("notified back")
            .unwrap();
    }
}
