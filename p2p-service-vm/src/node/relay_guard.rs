//! libp2p's relay client with one of its panics contained.
//!
//! `libp2p-relay` 0.22's client looks up the reservation of a connection
//! when the relay accepts it and panics ("Relay connection exist") when it
//! has forgotten it: a reservation listener that closed while its request
//! was in flight (the relay's answer comes after). The panic runs in the
//! swarm's task and so takes the whole node down; in our 60-node swarm tests
//! it did, a few times a run. The lookup fails before the client changes any
//! state, so dropping that one stale answer leaves the client as it was:
//! this wrapper does that, says so, and delegates everything else.

use std::panic::AssertUnwindSafe;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, relay};
use tracing::warn;

/// [`relay::client::Behaviour`], minus the panic on a stale answer.
pub struct RelayClient(relay::client::Behaviour);

impl RelayClient {
    pub fn new(inner: relay::client::Behaviour) -> Self {
        Self(inner)
    }
}

impl NetworkBehaviour for RelayClient {
    type ConnectionHandler = <relay::client::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = relay::client::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.0
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.0.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.0.on_swarm_event(event)
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        let inner = &mut self.0;
        let handled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            inner.on_connection_handler_event(peer_id, connection_id, event)
        }));
        if handled.is_err() {
            warn!(relay = %peer_id, ?connection_id, "dropped a relay's answer for a reservation already given up (libp2p-relay's panic, contained)");
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.0.poll(cx)
    }
}
