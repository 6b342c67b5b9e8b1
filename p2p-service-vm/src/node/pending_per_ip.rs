//! A cap on the inbound connections one remote address may have in their
//! handshake at once.
//!
//! `connection_limits` caps pending inbound connections for the whole node
//! (`limits.max_pending`, 128). On its own that cap is a lock: a single host
//! that opens a dozen silent TCP connections a second holds every pending
//! place for the 10 s handshake deadline, and no honest peer gets in until it
//! stops. Counting per address keeps one address to a few places, so the
//! node-wide cap is only reached by an attacker with many addresses. IPv6
//! addresses are counted per /64: one host is usually given a whole /64.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Why an inbound connection was refused before its handshake.
#[derive(Debug, thiserror::Error)]
#[error("{remote} already has {limit} inbound connections in their handshake")]
pub struct TooManyPending {
    /// The address (or IPv6 /64) refused.
    pub remote: IpAddr,
    /// The cap it reached.
    pub limit: u32,
}

/// The behaviour: it only counts and refuses, and never emits anything.
pub struct Behaviour {
    limit: u32,
    pending: HashMap<ConnectionId, IpAddr>,
    per_source: HashMap<IpAddr, u32>,
}

impl Behaviour {
    /// At most `limit` inbound connections in their handshake per address.
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            pending: HashMap::new(),
            per_source: HashMap::new(),
        }
    }

    fn admit(&mut self, id: ConnectionId, remote: &Multiaddr) -> Result<(), ConnectionDenied> {
        let Some(source) = source_of(remote) else {
            return Ok(());
        };
        let n = self.per_source.entry(source).or_default();
        if *n >= self.limit {
            return Err(ConnectionDenied::new(TooManyPending {
                remote: source,
                limit: self.limit,
            }));
        }
        *n += 1;
        self.pending.insert(id, source);
        Ok(())
    }

    fn done(&mut self, id: ConnectionId) {
        let Some(source) = self.pending.remove(&id) else {
            return;
        };
        if let Some(n) = self.per_source.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }

    /// Connections counted as in their handshake (for tests).
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// What a remote address is counted under: its IPv4 address, or its IPv6 /64.
fn source_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => Some(IpAddr::V4(v4)),
            None => {
                let prefix = u128::from(ip) & !((1u128 << 64) - 1);
                Some(IpAddr::V6(prefix.into()))
            }
        },
        _ => None,
    })
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.admit(connection_id, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _peer: PeerId,
        _local: &Multiaddr,
        _remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.done(connection_id);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        // A handshake that failed or was refused (by any behaviour) ends here;
        // one that succeeded ended in `handle_established_inbound_connection`.
        if let FromSwarm::ListenFailure(failure) = event {
            self.done(failure.connection_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    #[test]
    fn one_address_gets_only_its_share_and_others_still_get_in() {
        let mut b = Behaviour::new(3);
        let attacker = addr("/ip4/203.0.113.9/tcp/40000");
        let ids: Vec<_> = (0..3)
            .map(|_| ConnectionId::new_unchecked(rand_id()))
            .collect();
        for id in &ids {
            b.admit(*id, &attacker).expect("within the cap");
        }
        let refused = b
            .admit(ConnectionId::new_unchecked(rand_id()), &attacker)
            .expect_err("over the cap");
        let why = refused
            .downcast_ref::<TooManyPending>()
            .expect("refused as too many pending");
        assert_eq!(why.remote.to_string(), "203.0.113.9");
        b.admit(
            ConnectionId::new_unchecked(rand_id()),
            &addr("/ip4/198.51.100.1/udp/4001/quic-v1"),
        )
        .expect("another address gets in");
        // A handshake that ends gives its place back.
        b.done(ids[0]);
        b.admit(ConnectionId::new_unchecked(rand_id()), &attacker)
            .expect("a place came free");
        assert_eq!(b.pending(), 4);
    }

    #[test]
    fn ipv6_counts_per_slash_64_and_mapped_ipv4_as_ipv4() {
        let mut b = Behaviour::new(1);
        b.admit(
            ConnectionId::new_unchecked(rand_id()),
            &addr("/ip6/2001:db8:1:2::1/tcp/1"),
        )
        .expect("first");
        b.admit(
            ConnectionId::new_unchecked(rand_id()),
            &addr("/ip6/2001:db8:1:2:ffff::9/tcp/1"),
        )
        .expect_err("same /64");
        b.admit(
            ConnectionId::new_unchecked(rand_id()),
            &addr("/ip6/2001:db8:1:3::1/tcp/1"),
        )
        .expect("another /64");
        b.admit(
            ConnectionId::new_unchecked(rand_id()),
            &addr("/ip4/192.0.2.7/tcp/1"),
        )
        .expect("v4");
        b.admit(
            ConnectionId::new_unchecked(rand_id()),
            &addr("/ip6/::ffff:192.0.2.7/tcp/1"),
        )
        .expect_err("the same host, mapped");
    }

    #[test]
    fn unknown_connections_ending_change_nothing() {
        let mut b = Behaviour::new(1);
        let a = addr("/ip4/192.0.2.1/tcp/1");
        b.admit(ConnectionId::new_unchecked(1), &a).expect("first");
        b.done(ConnectionId::new_unchecked(2));
        b.admit(ConnectionId::new_unchecked(3), &a)
            .expect_err("still one in its handshake");
    }

    fn rand_id() -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(1_000);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }
}
