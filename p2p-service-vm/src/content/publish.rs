//! Publishing: an app's bytes enter the store through the virus filter and
//! the DRM checker, under a manifest this node signs, and are announced; the
//! quota's garbage collection follows.

use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use p2pvm_content::{ContentId, Manifest, StoreError};
use p2pvm_security::Verdict;
use prost::Message;
use tracing::{info, warn};

use super::ContentEvent;
use super::types::{ContentInfo, PublishMeta, VerifiedManifest, content_key, guess_mime, now_unix};
use super::{ContentService, ContentServiceError};
use crate::report::chain;

/// Tees what an import reads into a virus scan.
struct ScanningReader<R> {
    inner: R,
    scanner: Arc<Mutex<Option<p2pvm_security::Scanner>>>,
}

impl<R: std::io::Read> std::io::Read for ScanningReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0
            && let Some(s) = self.scanner.lock().expect("lock").as_mut()
        {
            s.blocking_feed(Bytes::copy_from_slice(&buf[..n]));
        }
        Ok(n)
    }
}

impl ContentService {
    /// Imports bytes read from `data` (blocking reader run off the async runtime),
    /// signs the manifest, stores both, and announces the item.
    pub async fn publish(
        &self,
        data: impl std::io::Read + Send + 'static,
        meta: PublishMeta,
    ) -> Result<ContentInfo, ContentServiceError> {
        if meta.name.len() > 1024 || meta.tags.len() > 64 || meta.tags.iter().any(|t| t.len() > 128)
        {
            return Err(ContentServiceError::BadRequest(
                "name ≤ 1024 bytes, ≤ 64 tags of ≤ 128 bytes".into(),
            ));
        }
        // Groups are named by id in the manifest; apps may use local names.
        let mut meta = meta;
        if let Some(r) = meta.rights.as_mut() {
            for g in r.allowed_groups.iter_mut() {
                match self.groups().resolve(g) {
                    Ok(id) => *g = id.to_string(),
                    Err(_) if g.parse::<p2pvm_security::GroupId>().is_ok() => {}
                    Err(e) => {
                        return Err(ContentServiceError::AllowedGroup(std::sync::Arc::new(e)));
                    }
                }
            }
        }
        // The DRM checker sees the manifest before any byte is read: rights
        // already expired, or a certification policy this node fails, refuse
        // the publish outright.
        let chain = self.inner.rights.chain().to_vec();
        let draft = Manifest {
            publisher: self.inner.ctx.node.peer_id().to_base58(),
            tags: meta.tags.clone(),
            rights: meta.rights.clone(),
            publisher_certificates: chain.clone(),
            ..Default::default()
        };
        self.drm_publish(&draft)?;
        let store = self.inner.ctx.store.clone();
        let key = self.inner.ctx.key.clone();
        let pin = meta.pin;
        // The signatures this import is scanned by, to cache its verdict under.
        let fingerprint = match &self.inner.verdicts {
            Some(v) => v.fingerprint(&self.inner.ctx.virus).await,
            None => None,
        };
        // The bytes go to clamd as they are imported; the verdict decides, before
        // the item becomes visible, whether it is committed.
        let scanner = Arc::new(Mutex::new(Some(self.inner.ctx.virus.scanner())));
        let verdict: Arc<Mutex<Option<Result<Verdict, p2pvm_security::VirusError>>>> =
            Arc::new(Mutex::new(None));
        // Read in large pieces, so clamd gets few large chunks.
        let data = std::io::BufReader::with_capacity(
            1 << 20,
            ScanningReader {
                inner: data,
                scanner: scanner.clone(),
            },
        );
        let rt = tokio::runtime::Handle::current();
        let seen = verdict.clone();
        let (info, signed) = tokio::task::spawn_blocking(move || {
            let mut signed = Vec::new();
            let info = store.import(data, |id, size| {
                let scan = scanner.lock().expect("lock").take();
                let v = match scan {
                    Some(s) => s.blocking_finish(&rt),
                    None => Ok(Verdict::Clean),
                };
                let declined = match &v {
                    Ok(Verdict::Clean) => None,
                    Ok(Verdict::Infected(sig)) => Some(format!("malware: {sig}")),
                    Err(e) => Some(crate::report::chain(e)),
                };
                *seen.lock().expect("lock") = Some(v);
                if let Some(why) = declined {
                    return Err(StoreError::Declined(why));
                }
                let mime = if meta.mime_type.is_empty() {
                    guess_mime(&meta.name)
                } else {
                    meta.mime_type.clone()
                };
                let m = Manifest {
                    content_id: id.0.to_vec(),
                    name: meta.name.clone(),
                    mime_type: mime,
                    size,
                    publisher: String::new(),
                    created_unix: now_unix(),
                    tags: meta.tags.clone(),
                    rights: meta.rights.clone(),
                    publisher_certificates: chain.clone(),
                };
                signed = m.sign(&key)?.encode_to_vec();
                Ok(signed.clone())
            })?;
            if pin {
                store.set_pinned(&info.id, true)?;
            }
            // The item may have existed already; report the manifest stored with it.
            let stored = store.manifest(&info.id)?.unwrap_or(signed);
            Ok::<_, StoreError>((info, stored))
        })
        .await
        .map_err(ContentServiceError::task)?
        .map_err(|e| match (e, verdict.lock().expect("lock").take()) {
            (StoreError::Declined(_), Some(Ok(Verdict::Infected(sig)))) => {
                warn!(signature = %sig, "refused a local publish: malware");
                self.emit(ContentEvent::MalwareDetected {
                    id: ContentId([0; 32]),
                    signature: sig.clone(),
                    peers: Vec::new(),
                });
                ContentServiceError::malware(sig)
            }
            (StoreError::Declined(_), Some(Err(v))) => v.into(),
            (e, _) => e.into(),
        })?;
        let manifest = VerifiedManifest::parse(&signed)?;
        info!(id = %info.id, size = info.size, name = %manifest.manifest.name, "published");
        // Scanned clean as it was imported (else it would not be stored).
        self.remember_clean(&info.id, fingerprint).await;
        self.announce(&manifest).await;
        self.gc().await;
        Ok(ContentInfo {
            manifest,
            local: Some(info),
            providers: vec![self.inner.ctx.node.peer_id()],
        })
    }

    /// Publishes a file the node can read (host mode).
    pub async fn publish_path(
        &self,
        path: &Path,
        mut meta: PublishMeta,
    ) -> Result<ContentInfo, ContentServiceError> {
        if !self.inner.config.allow_path_publish {
            return Err(ContentServiceError::Denied(
                "publishing by path is disabled on this node; send the bytes instead".into(),
            ));
        }
        let path = path.to_owned();
        let (real, file) = self
            .blocking(move |svc| {
                let real = std::fs::canonicalize(&path).map_err(|e| {
                    ContentServiceError::BadRequest(format!("{}: {e}", path.display()))
                })?;
                let data_dir = std::fs::canonicalize(&svc.inner.ctx.config.data_dir)
                    .unwrap_or(svc.inner.ctx.config.data_dir.clone());
                // The node's own key and tokens live there; never let an app publish them.
                if real.starts_with(&data_dir) {
                    return Err(ContentServiceError::Denied(
                        "files inside the node's data directory cannot be published".into(),
                    ));
                }
                let file = std::fs::File::open(&real).map_err(|e| {
                    ContentServiceError::BadRequest(format!("{}: {e}", real.display()))
                })?;
                Ok((real, file))
            })
            .await??;
        if meta.name.is_empty() {
            meta.name = real
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        self.publish(file, meta).await
    }

    pub(super) async fn gc(&self) {
        let quota = self.inner.config.quota_bytes;
        if quota == 0 {
            return;
        }
        let store = self.inner.ctx.store.clone();
        match tokio::task::spawn_blocking(move || store.gc(quota)).await {
            Ok(Ok(removed)) if !removed.is_empty() => {
                info!(
                    count = removed.len(),
                    "garbage-collected unpinned items over the quota"
                );
                for id in removed {
                    self.inner.rights.forget(&id);
                    let _ = self
                        .inner
                        .ctx
                        .node
                        .send(crate::node::Command::StopProviding(content_key(&id)))
                        .await;
                }
            }
            Ok(Err(e)) => warn!(error = %chain(&e), "garbage collection failed"),
            _ => {}
        }
    }
}
