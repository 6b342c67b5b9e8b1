//! How the content service starts: its parts built from the node context and
//! the configuration, then its tasks (the server, the fast path's listener,
//! CRL watching, announcing, the first clamd check).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::{ContentService, ContentServiceError, Inner, LocalError};
use super::{budget, events, fastpath, fetch, limits, portmap, rights, server, slots, verdicts};
use crate::context::NodeContext;
use crate::report::chain;

/// The system clock plus the seconds in `file` (tests of expiry only; see
/// `ContentConfig::test_clock_offset_file`).
fn offset_clock(file: std::path::PathBuf) -> p2pvm_security::groups::Clock {
    p2pvm_security::groups::Clock::from_fn(move || {
        let offset: i64 = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        now.saturating_add(offset).max(0) as u64
    })
}
impl ContentService {
    /// Starts serving the transfer protocol over the node's store and
    /// re-announces stored items.
    pub fn start(ctx: NodeContext) -> Result<Self, ContentServiceError> {
        let data_dir = ctx.config.data_dir.clone();
        let virus = &ctx.config.virus;
        let drm = &ctx.config.drm;
        let credit = ctx.config.credit.clone();
        let listen = ctx.config.listen.clone();
        let config = ctx.config.content.clone();
        let key = &ctx.key;
        let local = key.public().to_peer_id();
        let mut groups = p2pvm_security::Groups::open(&data_dir.join("groups"), local)
            .map_err(|e| ContentServiceError::from(LocalError::Groups(e)))?;
        if let Some(file) = config.test_clock_offset_file.clone() {
            warn!(file = %file.display(), "CLOCK FAULT INJECTION IS ON: group certificates are checked at a time a test moves (tests only)");
            groups = groups.with_clock(offset_clock(file));
        }
        let groups = Arc::new(groups);
        let fast_path = if config.fast_path {
            let fast = fastpath::FastPath::new(key)
                .and_then(|f| f.with_groups(groups.clone(), key))
                .map_err(|e| ContentServiceError::from(LocalError::FastPath(e)))?;
            Some(fast)
        } else {
            None
        };
        let rights = rights::Rights::load(drm, local, groups)?;
        if config.test_silent_server {
            warn!(
                "CONTENT FAULT INJECTION IS ON: this node answers no content request (tests only)"
            );
        }
        if config.test_answer_delay_secs > 0 {
            warn!(
                delay_secs = config.test_answer_delay_secs,
                "CONTENT FAULT INJECTION IS ON: this node answers each content stream late (tests only)"
            );
        }
        if config.test_wrong_group_keys {
            warn!("GROUP FAULT INJECTION IS ON: this node hands out wrong topic keys (tests only)");
        }
        let filter = ctx.virus.clone();
        let ping = filter.enabled().then(|| filter.clone());
        let budget = budget::Budget::new(config.memory_budget_bytes / p2pvm_content::BLOCK_BYTES);
        let read_ahead = Arc::new(tokio::sync::Semaphore::new(
            (config.read_ahead_bytes / fetch::READ_AHEAD_UNIT)
                .min(tokio::sync::Semaphore::MAX_PERMITS as u64) as usize,
        ));
        let verdicts = filter.enabled().then(|| {
            verdicts::Verdicts::open(&data_dir.join("verdicts.redb"), virus.database_dir.clone())
        });
        let verdicts = match verdicts {
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                warn!(error = %chain(&e), "cannot open the verdict cache: every fetch is scanned");
                None
            }
            None => None,
        };
        let ban_secs = virus.ban_hours * 3600.0;
        let svc = Self {
            inner: Arc::new(Inner {
                ctx,
                ban_secs,
                credit,
                limiter: limits::Limiter::new(config.upload_rate_bytes_per_sec),
                throttles: limits::PeerThrottles::default(),
                served: Arc::default(),
                upload_slots: slots::UploadSlots::new(
                    config.upload_slots as usize,
                    config.upload_rate_bytes_per_sec,
                ),
                search_limits: limits::SearchLimits::default(),
                serve_permits: Arc::new(tokio::sync::Semaphore::new(limits::BATCHES_IN_FLIGHT)),
                peer_batches: limits::PeerBatches::default(),
                config,
                downloads: Mutex::new(HashMap::new()),
                ended: Mutex::default(),
                events: events::ContentEvents::default(),
                fast_path,
                fast_path_port: std::sync::atomic::AtomicU16::new(0),
                local_readers: Arc::new(tokio::sync::Semaphore::new(32)),
                read_ahead,
                budget,
                verdicts,
                rights,
                group_messages: Arc::new(tokio::sync::Semaphore::new(32)),
            }),
        };
        if let Some(f) = ping {
            let primed = svc.clone();
            svc.spawn(async move {
                match f.ping().await {
                    Ok(()) => {
                        info!(clamd = %f.describe(), "virus filter ready");
                        // Learn clamd's version now, so cached verdicts stay
                        // usable if clamd is away later.
                        if let Some(v) = &primed.inner.verdicts {
                            v.fingerprint(&f).await;
                        }
                    }
                    Err(e) => {
                        warn!(error = %chain(&e), "virus filter cannot reach clamd: content will be refused until it can")
                    }
                }
            });
        }
        server::spawn(svc.clone());
        svc.watch_crls();
        if svc.inner.fast_path.is_some() {
            svc.listen_fast_path(&listen);
        }
        let again = svc.clone();
        svc.spawn(async move { again.announce_as_the_network_grows().await });
        Ok(svc)
    }

    /// Binds the fast path next to the first TCP listen address. A node that
    /// cannot still serves everything over libp2p.
    fn listen_fast_path(&self, listen: &[String]) {
        let port = self.inner.config.fast_path_port;
        let Some(addr) = fastpath::listen_addr(listen, port) else {
            info!("no TCP listen address: the content fast path is off");
            return;
        };
        let bound = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std);
        match bound {
            Ok(l) => {
                let bound = l.local_addr().ok();
                let port = bound.map_or(0, |a| a.port());
                self.inner
                    .fast_path_port
                    .store(port, std::sync::atomic::Ordering::Release);
                server::spawn_fast_path(self.clone(), l);
                if let Some(bound) = bound
                    && self.inner.ctx.config.nat.upnp
                {
                    portmap::spawn(self, bound);
                }
            }
            Err(e) => warn!(%addr, error = %chain(&e), "cannot listen for the content fast path"),
        }
    }
}
