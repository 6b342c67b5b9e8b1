//! The content service's plain types and names: verified manifests, what an
//! app publishes and is told, the DHT keys items and keywords are announced
//! under. A leaf: it imports nothing else of the service but the clock.

use libp2p::PeerId;
use libp2p::kad::RecordKey;
use p2pvm_content::{ContentId, ItemInfo, Manifest, ManifestError, Rights, SignedManifest};

/// A manifest whose signature was checked.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    /// The id it describes.
    pub id: ContentId,
    /// The decoded fields.
    pub manifest: Manifest,
    /// The signed encoding, as stored and sent.
    pub signed: Vec<u8>,
}

impl VerifiedManifest {
    /// Decodes and verifies a signed manifest from anywhere.
    pub fn parse(signed: &[u8]) -> Result<Self, ManifestError> {
        let manifest = SignedManifest::verify_bytes(signed)?;
        Ok(Self {
            id: manifest.id()?,
            manifest,
            signed: signed.to_vec(),
        })
    }
}

/// What an app supplies when publishing.
#[derive(Debug, Clone, Default)]
pub struct PublishMeta {
    /// Human name.
    pub name: String,
    /// MIME type; guessed from the name when empty.
    pub mime_type: String,
    /// Search tags.
    pub tags: Vec<String>,
    /// Rights section.
    pub rights: Option<Rights>,
    /// Keep regardless of the quota.
    pub pin: bool,
}

/// An item as reported to apps.
#[derive(Debug, Clone)]
pub struct ContentInfo {
    /// Manifest.
    pub manifest: VerifiedManifest,
    /// Held in the local store.
    pub local: Option<ItemInfo>,
    /// Peers known to provide it.
    pub providers: Vec<PeerId>,
}

/// The DHT key under which providers of an item are announced.
pub fn content_key(id: &ContentId) -> RecordKey {
    let mut h = blake3::Hasher::new();
    h.update(b"p2pvm/content/v1/");
    h.update(&id.0);
    RecordKey::new(h.finalize().as_bytes())
}

/// The DHT key under which providers of items with a keyword are announced.
pub fn keyword_key(word: &str) -> RecordKey {
    let mut h = blake3::Hasher::new();
    h.update(b"p2pvm/keyword/v1/");
    h.update(word.as_bytes());
    RecordKey::new(h.finalize().as_bytes())
}

pub(crate) use crate::clock::now_unix;

/// Guesses a MIME type from a file name, for players and browsers.
pub fn guess_mime(name: &str) -> String {
    let ext = name.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "mp4" | "m4v" => "video/mp4",
        "webm" => "video/webm",
        "mkv" => "video/x-matroska",
        "mp3" => "audio/mpeg",
        "ogg" | "oga" => "audio/ogg",
        "flac" => "audio/flac",
        "wav" => "audio/wav",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "txt" | "md" => "text/plain; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "json" => "application/json",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
    .into()
}
