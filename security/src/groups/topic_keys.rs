//! Topic keys: each epoch's key (epoch = the CRL's number) comes from the
//! group CA's signature over the epoch; the owner signs, members take a
//! signature only if it checks, and an `openssl` command is offered where
//! the CA key is kept elsewhere.

use super::*;

impl Groups {
    /// The newest group-topic key this node holds for group `id`: (epoch,
    /// key). Only current members hold one.
    pub fn topic_key(&self, id: GroupId) -> Option<(u64, [u8; KEY_LEN])> {
        let groups = self.lock();
        let (epoch, keys) = groups.get(&id)?.epochs.last_key_value()?;
        Some((*epoch, keys.first()?.key))
    }

    /// Group `id`'s topic key of `epoch` that this node seals with, if held.
    pub fn topic_key_at(&self, id: GroupId, epoch: u64) -> Option<[u8; KEY_LEN]> {
        Some(self.lock().get(&id)?.keys_at(epoch).next()?.key)
    }

    /// Every key of group `id`'s `epoch` held (more than one when its CA
    /// signed the epoch more than once): what a message is opened with.
    pub fn topic_keys_at(&self, id: GroupId, epoch: u64) -> Vec<[u8; KEY_LEN]> {
        self.lock()
            .get(&id)
            .map(|g| g.keys_at(epoch).map(|e| e.key).collect())
            .unwrap_or_default()
    }

    /// The CA signature group `id`'s sealing key of `epoch` comes from, if
    /// held: what a member hands another.
    pub fn epoch_signature(&self, id: GroupId, epoch: u64) -> Option<Vec<u8>> {
        Some(
            self.lock()
                .get(&id)?
                .keys_at(epoch)
                .next()?
                .signature
                .clone(),
        )
    }

    /// Takes group `id`'s epoch signature of `epoch` (from a member, or from
    /// the operator of a CA kept elsewhere) if the group CA made it and
    /// `epoch` is not after the CRL held, and keeps it (mode 0600: it reads
    /// the group's topics). Returns the key. A key already held stays first;
    /// another the CA signed for the same epoch is kept beside it.
    pub fn take_epoch_signature(
        &self,
        id: GroupId,
        epoch: u64,
        signature: &[u8],
    ) -> Result<[u8; KEY_LEN], GroupError> {
        let ca = {
            let groups = self.lock();
            let g = groups
                .get(&id)
                .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
            g.ca_der.clone()
        };
        let key = group_topics::epoch_key(&ca, id, epoch, signature)?;
        // Checked, written and kept under one lock: memory and disk hold
        // the same keys in the same order.
        let mut groups = self.lock();
        let g = groups
            .get_mut(&id)
            .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
        if epoch > g.crl_number {
            return Err(GroupError::EpochKey(EpochKeyError::NotCurrent {
                epoch,
                held: g.crl_number,
            }));
        }
        if g.keys_at(epoch).any(|e| e.key == key) {
            return Ok(key);
        }
        let dir = g.dir.join("keys");
        std::fs::create_dir_all(&dir).map_err(io("storing a topic key"))?;
        let name = if g.keys_at(epoch).next().is_none() {
            format!("{epoch}.sig")
        } else {
            format!("{epoch}-{}.sig", &blake3::hash(&key).to_hex()[..16])
        };
        write_file(&dir.join(name), signature, 0o600)?;
        g.epochs.entry(epoch).or_default().push(Epoch {
            key,
            signature: signature.to_vec(),
        });
        Ok(key)
    }

    /// Signs group `id`'s epoch `epoch` with its CA key (owner only).
    pub(super) fn sign_epoch(&self, id: GroupId, epoch: u64) -> Result<(), GroupError> {
        let pkcs8 = {
            let groups = self.lock();
            groups
                .get(&id)
                .ok_or_else(|| GroupError::Unknown(id.to_string()))?
                .ca_key_pkcs8()?
        };
        let signature = group_topics::sign_epoch(&pkcs8, id, epoch)?;
        self.take_epoch_signature(id, epoch, &signature).map(|_| ())
    }

    /// The `openssl` command with which the operator of group `id`'s CA
    /// (kept outside any node) signs `epoch`, writing `out`.
    pub fn openssl_epoch_command(
        &self,
        id: GroupId,
        epoch: u64,
        out: &str,
    ) -> Result<String, GroupError> {
        let ca = self
            .lock()
            .get(&id)
            .ok_or_else(|| GroupError::Unknown(id.to_string()))?
            .ca_der
            .clone();
        Ok(group_topics::openssl_epoch_command(&ca, id, epoch, out)?)
    }
}
