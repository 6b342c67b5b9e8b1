//! On disk: one directory per group (`name`, `ca.pem`, `member.pem`,
//! `crl.pem`, the owner's `ca.key` and `issued/`, the topic keys' epochs),
//! read into a [`Group`] and written atomically.

use super::*;

/// Writes `bytes` to `path` atomically (a temporary file renamed over it),
/// with `mode`.
pub(super) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), GroupError> {
    // A name of its own: two writers of one file never share a half-written
    // temporary.
    let tmp = path.with_extension(format!("tmp.{:016x}", rand::random::<u64>()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(format!("writing {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("writing {}", path.display())))
}

impl Group {
    pub(super) fn load(dir: &Path) -> Result<Self, GroupError> {
        let read = |f: &str| std::fs::read(dir.join(f));
        let name = std::fs::read_to_string(dir.join("name"))
            .map_err(io(format!("reading {}/name", dir.display())))?
            .trim()
            .to_owned();
        let ca = read("ca.pem").map_err(io(format!("reading {}/ca.pem", dir.display())))?;
        let ca_der = pki::certs_from_bytes(&ca)?.remove(0);
        let member_der = match read("member.pem") {
            Ok(b) => Some(pki::certs_from_bytes(&b)?.remove(0)),
            Err(_) => None,
        };
        let crl_der = match read("crl.pem") {
            Ok(b) => Some(pki::crls_from_bytes(&b)?.remove(0)),
            Err(_) => None,
        };
        let crl_number = match &crl_der {
            Some(c) => crl_checked(c, &ca_der)?.0,
            None => 0,
        };
        let id = group_id(&ca_der)?;
        let epochs = load_epochs(&dir.join("keys"), &ca_der, id, crl_number);
        Ok(Self {
            name,
            dir: dir.to_owned(),
            ca_der,
            member_der,
            crl_der,
            crl_number,
            epochs,
            owner: dir.join("ca.key").exists(),
            relays_crl: dir.join(RELAY_CRL).exists(),
        })
    }

    pub(super) fn crl_number(&self) -> u64 {
        self.crl_number
    }

    /// The keys held for `epoch`, the one that seals first.
    pub(super) fn keys_at(&self, epoch: u64) -> impl Iterator<Item = &Epoch> {
        self.epochs.get(&epoch).into_iter().flatten()
    }

    pub(super) fn trust(&self) -> Result<TrustList, CertError> {
        let crls: Vec<Vec<u8>> = self.crl_der.iter().cloned().collect();
        TrustList::from_der(std::slice::from_ref(&self.ca_der), &crls)
    }

    pub(super) fn info(&self, id: GroupId) -> GroupInfo {
        GroupInfo {
            id,
            name: self.name.clone(),
            owner: self.owner,
            ca_subject: pki::subject_of(&self.ca_der),
            member_until: self
                .member_der
                .as_ref()
                .and_then(|m| validity(m).ok())
                .map(|(_, until)| until),
            crl_number: self.crl_number(),
            relays_crl: self.owner || self.relays_crl,
        }
    }

    /// The CA key (PKCS#8 DER), owner only.
    pub(super) fn ca_key_pkcs8(&self) -> Result<Vec<u8>, GroupError> {
        if !self.owner {
            return Err(GroupError::NotOwner(self.name.clone()));
        }
        let key_pem = std::fs::read_to_string(self.dir.join("ca.key"))
            .map_err(io(format!("reading {}/ca.key", self.dir.display())))?;
        Ok(KeyPair::from_pem(&key_pem).map_err(make)?.serialize_der())
    }

    /// The CA key and an issuer made from it (same subject, same key: what
    /// rcgen needs to sign as this CA).
    pub(super) fn issuer(&self) -> Result<(rcgen::Certificate, KeyPair), GroupError> {
        if !self.owner {
            return Err(GroupError::NotOwner(self.name.clone()));
        }
        let key_pem = std::fs::read_to_string(self.dir.join("ca.key"))
            .map_err(io(format!("reading {}/ca.key", self.dir.display())))?;
        let key = KeyPair::from_pem(&key_pem).map_err(make)?;
        let (from, until) = validity(&self.ca_der)?;
        let params = ca_params(&self.name, from, until)?;
        let cert = params.self_signed(&key).map_err(make)?;
        Ok((cert, key))
    }
}

/// The epoch signatures stored in `keys` (`<epoch>.sig`, the first; more
/// as `<epoch>-<digest>.sig`), each checked against the CA again: a file
/// swapped on disk gives no key. Signatures of epochs after the CRL held
/// (`crl_number`) are deleted, never used: a key is only ever made for an
/// epoch whose CRL is current, so a member revoked by that CRL cannot have
/// been handed it. Raw key files of older versions are deleted too (an
/// owner signs its current epoch again on open).
pub(super) fn load_epochs(
    keys: &Path,
    ca_der: &[u8],
    id: GroupId,
    crl_number: u64,
) -> BTreeMap<u64, Vec<Epoch>> {
    let mut found: Vec<(u64, String, Vec<u8>)> = Vec::new();
    for e in std::fs::read_dir(keys).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let epoch = name
            .strip_suffix(".sig")
            .and_then(|n| n.split('-').next())
            .and_then(|n| n.parse::<u64>().ok());
        match epoch {
            Some(epoch) if epoch <= crl_number => {
                if let Ok(signature) = std::fs::read(e.path()) {
                    found.push((epoch, name, signature));
                }
            }
            Some(_) => {
                tracing::warn!(group = %id, file = %name, "deleting a topic key of an epoch after the CRL held");
                let _ = std::fs::remove_file(e.path());
            }
            None if name.bytes().all(|b| b.is_ascii_digit()) => {
                let _ = std::fs::remove_file(e.path());
            }
            None => {}
        }
    }
    // `<epoch>.sig` sorts before `<epoch>-….sig`: the first key stays first.
    found.sort_by(|a, b| (a.0, a.1.len(), &a.1).cmp(&(b.0, b.1.len(), &b.1)));
    let mut epochs: BTreeMap<u64, Vec<Epoch>> = BTreeMap::new();
    for (epoch, _, signature) in found {
        match group_topics::epoch_key(ca_der, id, epoch, &signature) {
            Ok(key) => epochs
                .entry(epoch)
                .or_default()
                .push(Epoch { key, signature }),
            Err(err) => {
                tracing::warn!(group = %id, epoch, error = %err, "ignoring a stored topic key")
            }
        }
    }
    epochs
}
