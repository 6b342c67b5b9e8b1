//! The content fast path: block transfers on a TCP connection of their own,
//! secured with TLS 1.3, beside the libp2p connection.
//!
//! ```text
//!  downloader ── libp2p stream: Have ──────────────────────► provider
//!             ◄─ Have answer + fast-path port ─────────────
//!             ══ TCP: TLS 1.3 handshake (libp2p certificates), ═══► the same
//!                then sealed frames (AES-GCM, keys from the handshake)
//!                carrying /p2pvm/content/2 requests, pipelined
//! ```
//!
//! Why: libp2p's TCP transport carries every stream through Noise
//! (ChaCha20-Poly1305) and Yamux. On loopback that holds a content transfer
//! near 350 MiB/s, a tenth of what the link carries; a connection of its own
//! with AES-GCM, which these CPUs run in hardware, in frames as large as a
//! block (`p2pvm_security::sealed`), comes much closer to it.
//!
//! This module is the network glue: it listens, dials, accepts, limits
//! connections per address and hands each session to the content server.
//! Who may open a session is `p2pvm_security::peer_tls`'s policy (libp2p's
//! own certificates, so the provider knows which peer asks and its credit
//! policy applies, and the downloader knows it reached the provider it
//! chose); what follows the handshake is `p2pvm_security::sealed`. A
//! downloader learns the port from the provider's `Have` answer and dials
//! the address its libp2p connection already uses; when that fails (a
//! firewall, a NAT) it keeps the libp2p stream.
//!
//! Group sessions use the same listener: a client that offers the ALPN
//! protocol `p2pvm-group/1/<group id>` gets a handshake with member
//! certificates of that group instead (`p2pvm_security::group_tls`: the
//! group CA the only anchor, the CRL checked, the certificate's key the
//! peer's own), and the requests of that connection are served as from a
//! member of that group — the only way group content leaves this node.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use p2pvm_security::sealed::{self, SealedReader, SealedWriter, Side};
use p2pvm_security::{GroupId, Groups, PeerTls, PeerTlsError};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

/// The lowest content type of a TLS record (change_cipher_spec).
const TLS_RECORD_MIN: u8 = 0x14;
/// How long a TCP connect plus TLS handshake may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The fast path's dialler and acceptor; who may connect is
/// [`PeerTls`]'s (in `security`), what follows the handshake
/// [`sealed`]'s.
#[derive(Debug)]
pub(crate) struct FastPath {
    tls: PeerTls,
}

impl FastPath {
    /// The fast path of the node with `key`.
    pub fn new(key: &Keypair) -> Result<Self, PeerTlsError> {
        Ok(Self {
            tls: PeerTls::new(key)?,
        })
    }

    /// Adds group sessions for the node with `key`, a member of `groups`.
    pub fn with_groups(self, groups: Arc<Groups>, key: &Keypair) -> Result<Self, PeerTlsError> {
        Ok(Self {
            tls: self.tls.with_groups(groups, key)?,
        })
    }

    /// Dials `peer`'s fast path at `addr` for a session in `group`: both
    /// ends show their member certificates; the handshake fails unless the
    /// other end is `peer` and a current member.
    pub async fn dial_group(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        group: GroupId,
    ) -> std::io::Result<(SealedReader, SealedWriter)> {
        let config = self
            .tls
            .group_client_config(group, peer)
            .map_err(std::io::Error::other)?;
        self.dial_with(TlsConnector::from(config), addr).await
    }

    /// Dials `peer`'s fast path at `addr`; the handshake fails unless the
    /// other end proves it is `peer`.
    pub async fn dial(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> std::io::Result<(SealedReader, SealedWriter)> {
        let config = self
            .tls
            .client_config(peer)
            .map_err(std::io::Error::other)?;
        self.dial_with(TlsConnector::from(config), addr).await
    }

    async fn dial_with(
        &self,
        connector: TlsConnector,
        addr: SocketAddr,
    ) -> std::io::Result<(SealedReader, SealedWriter)> {
        let go = async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            // Any name: the peer id in the certificate is what is checked.
            let name = ServerName::IpAddress(addr.ip().into());
            let mut tls = connector.connect(name, tcp).await?;
            // TLS 1.3 ends the client's handshake before the server has
            // judged the client's certificate: a refusal arrives as an alert
            // record (type 0x15-0x17: TLS 1.3 hides alerts in application
            // data records) where the server's first sealed frame would be,
            // whose length starts with 0. Read it as TLS, for its reason.
            let mut first = [0u8; 1];
            let n = tls.get_ref().0.peek(&mut first).await?;
            if n == 0 || first[0] >= TLS_RECORD_MIN {
                use tokio::io::AsyncReadExt;
                let _read = tls.read(&mut first).await?;
                return Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
            }
            let (tcp, session) = tls.into_inner();
            sealed::establish(tcp, &session, Side::Client).await
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, go)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }

    /// The server side of a handshake on `tcp`: the plain fast path's, or a
    /// group session's when the client asks for one (and the group it is of).
    pub(crate) async fn accept(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<(tokio_rustls::server::TlsStream<TcpStream>, Option<GroupId>)> {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        let (config, group) = self
            .tls
            .server_config_for(&start.client_hello())
            .map_err(std::io::Error::other)?;
        Ok((start.into_stream(config).await?, group))
    }
}

/// Where the fast path listens: the host of the first TCP listen address,
/// on `port` (0: any free port).
pub(crate) fn listen_addr(listen: &[String], port: u16) -> Option<SocketAddr> {
    listen.iter().find_map(|a| {
        let m: Multiaddr = a.parse().ok()?;
        let mut ip = None;
        let mut tcp = false;
        for p in m.iter() {
            match p {
                Protocol::Ip4(v) => ip = Some(IpAddr::V4(v)),
                Protocol::Ip6(v) => ip = Some(IpAddr::V6(v)),
                Protocol::Tcp(_) => tcp = true,
                _ => {}
            }
        }
        Some(SocketAddr::new(ip?, port)).filter(|_| tcp)
    })
}

/// The IP address a multiaddr dials, if any.
pub(crate) fn ip_of(m: &Multiaddr) -> Option<IpAddr> {
    m.iter().find_map(|p| match p {
        Protocol::Ip4(v) => Some(IpAddr::V4(v)),
        Protocol::Ip6(v) => Some(IpAddr::V6(v)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pvm_security::peer_tls;
    use rustls::pki_types::CertificateDer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A provider-side listener that completes handshakes and echoes one byte,
    /// reporting the peer id each client proved.
    async fn listener(
        fast: Arc<FastPath>,
    ) -> (SocketAddr, tokio::sync::mpsc::Receiver<Option<PeerId>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                let (fast, tx) = (fast.clone(), tx.clone());
                tokio::spawn(async move {
                    let Ok((tls, _)) = fast.accept(tcp).await else {
                        let _ = tx.send(None).await;
                        return;
                    };
                    let peer = peer_tls::session_peer(tls.get_ref().1.peer_certificates());
                    let _ = tx.send(peer).await;
                    let (tcp, session) = tls.into_inner();
                    let Ok((mut rd, mut wr)) = sealed::establish(tcp, &session, Side::Server).await
                    else {
                        return;
                    };
                    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
                    let mut b = [0u8; 1];
                    if rd.read_exact(&mut b).await.is_ok() {
                        let _ = wr.write_all(&b).await;
                        let _ = wr.flush().await;
                    }
                });
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn both_ends_prove_their_peer_ids() {
        let (pk, dk) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let provider = Arc::new(FastPath::new(&pk).unwrap());
        let downloader = FastPath::new(&dk).unwrap();
        let (addr, mut seen) = listener(provider).await;

        let (mut rd, mut wr) = downloader
            .dial(pk.public().to_peer_id(), addr)
            .await
            .unwrap();
        use futures::{AsyncReadExt as _, AsyncWriteExt as _};
        wr.write_all(&[7]).await.unwrap();
        wr.flush().await.unwrap();
        let mut b = [0u8; 1];
        rd.read_exact(&mut b).await.unwrap();
        assert_eq!(b, [7]);
        assert_eq!(seen.recv().await.unwrap(), Some(dk.public().to_peer_id()));
    }

    #[tokio::test]
    async fn a_provider_that_is_not_the_expected_peer_is_refused() {
        let pk = Keypair::generate_ed25519();
        let provider = Arc::new(FastPath::new(&pk).unwrap());
        let downloader = FastPath::new(&Keypair::generate_ed25519()).unwrap();
        let (addr, _seen) = listener(provider).await;
        let someone_else = Keypair::generate_ed25519().public().to_peer_id();
        let e = downloader.dial(someone_else, addr).await.unwrap_err();
        assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    }

    #[tokio::test]
    async fn clients_without_a_libp2p_certificate_are_refused() {
        let provider = Arc::new(FastPath::new(&Keypair::generate_ed25519()).unwrap());
        let (addr, mut seen) = listener(provider).await;

        // A real X.509 certificate, self-signed, but without libp2p's extension.
        let forged = rcgen::generate_simple_self_signed(vec!["mallory".into()]).unwrap();
        let cert = CertificateDer::from(forged.cert.der().to_vec());
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(forged.key_pair.serialize_der()).unwrap();
        let prov = peer_tls::provider();
        let mut config = rustls::ClientConfig::builder_with_provider(prov.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(peer_tls::peer_verifier(None))
            .with_client_auth_cert(vec![cert], key)
            .unwrap();
        config.alpn_protocols = vec![peer_tls::ALPN.to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::IpAddress(addr.ip().into());
        let r = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await;
        // TLS 1.3 may finish the client's side first; the server's verdict is
        // what counts, and the connection carries nothing.
        if let Ok(mut tls) = r {
            let _ = tls.write_all(&[1]).await;
            let mut b = [0u8; 1];
            assert!(tls.read_exact(&mut b).await.is_err());
        }
        assert_eq!(seen.recv().await.unwrap(), None, "the handshake must fail");

        // And no certificate at all.
        let config = rustls::ClientConfig::builder_with_provider(prov)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(peer_tls::peer_verifier(None))
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::IpAddress(addr.ip().into());
        let _ = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await;
        assert_eq!(seen.recv().await.unwrap(), None, "the handshake must fail");
    }

    #[test]
    fn listens_beside_the_first_tcp_address() {
        let listen = vec![
            "/ip4/127.0.0.1/udp/0/quic-v1".to_string(),
            "/ip4/10.1.2.3/tcp/4001".to_string(),
        ];
        assert_eq!(listen_addr(&listen, 0), Some("10.1.2.3:0".parse().unwrap()));
        assert_eq!(listen_addr(&listen[..1], 0), None);
        let m: Multiaddr =
            "/ip4/192.0.2.7/tcp/9/p2p/12D3KooWKs4ou9BqB4m7rwYJtXq2GChCZDthC3G87tzvExuaixAx"
                .parse()
                .unwrap();
        assert_eq!(ip_of(&m), Some("192.0.2.7".parse().unwrap()));
    }
}
