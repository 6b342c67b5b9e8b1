//! Checking: joining by an invitation, taking a group's CRLs, listing
//! members, and deciding whether a peer is a current member, with the X.509
//! parsing this takes.

use super::*;

pub(super) fn validity(cert_der: &[u8]) -> Result<(u64, u64), CertError> {
    let (_, c) = X509Certificate::from_der(cert_der).map_err(|e| CertError::Malformed {
        what: "certificate",
        source: Cause::new(e),
    })?;
    let v = c.validity();
    Ok((
        v.not_before.timestamp().max(0) as u64,
        v.not_after.timestamp().max(0) as u64,
    ))
}

pub(super) fn serial_of(cert_der: &[u8]) -> Result<Vec<u8>, CertError> {
    let (_, c) = X509Certificate::from_der(cert_der).map_err(|e| CertError::Malformed {
        what: "certificate",
        source: Cause::new(e),
    })?;
    Ok(c.raw_serial().to_vec())
}

/// The CRL's number and the serials it revokes, if its signature verifies
/// with the CA's key.
pub(super) fn crl_checked(
    crl_der: &[u8],
    ca_der: &[u8],
) -> Result<(u64, Vec<Vec<u8>>), GroupError> {
    let (_, ca) = X509Certificate::from_der(ca_der)
        .map_err(|e| GroupError::crl_failed("the group CA does not parse", e))?;
    let (_, crl) = CertificateRevocationList::from_der(crl_der)
        .map_err(|e| GroupError::crl_failed("not a CRL", e))?;
    if crl.issuer() != ca.subject() {
        return Err(GroupError::crl("issued by another CA"));
    }
    crl.verify_signature(ca.public_key())
        .map_err(|e| GroupError::crl_failed("its signature does not verify", e))?;
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| GroupError::crl("it has no CRL number"))?;
    let serials = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().to_vec())
        .collect();
    Ok((number, serials))
}

impl Groups {
    /// Joins a group from an invitation (PEM: the group CA first, then this
    /// node's member certificate, then optionally a CRL), under `name` or the
    /// CA's common name. The certificate must chain to that CA, be valid now,
    /// not be revoked, and name this node.
    pub fn join(&self, invitation: &[u8], name: Option<&str>) -> Result<GroupInfo, GroupError> {
        let certs = pki::certs_from_bytes(invitation)?;
        let [ca_der, member_der, ..] = certs.as_slice() else {
            return Err(GroupError::Invitation(
                "it needs the group CA and a member certificate".into(),
            ));
        };
        // A CRL that does not parse refuses the invitation; none is fine.
        let crl = pki::crls_from_bytes(invitation)?.into_iter().next();
        if let Some(c) = &crl {
            crl_checked(c, ca_der)?;
        }
        let trust = TrustList::from_der(std::slice::from_ref(ca_der), crl.as_slice())?;
        trust.verify_peer(
            std::slice::from_ref(member_der),
            &self.local,
            self.clock.now(),
            KeyUsage::required_if_present(EKU_CLIENT_AUTH),
        )?;
        pki::certifies_key_of(member_der, &self.local)?;
        let id = group_id(ca_der)?;
        let taken = |n: &str| self.lock().iter().any(|(gid, g)| g.name == n && *gid != id);
        let name = match name {
            Some(n) => n.to_owned(),
            None => {
                let cn = X509Certificate::from_der(ca_der).ok().and_then(|(_, c)| {
                    c.subject()
                        .iter_common_name()
                        .next()
                        .and_then(|cn| cn.as_str().ok().map(str::to_owned))
                });
                local_name(cn.as_deref(), id, &taken)
            }
        };
        if !valid_name(&name) {
            return Err(GroupError::BadName(name));
        }
        if taken(&name) {
            return Err(GroupError::Exists(name));
        }
        let dir = self.dir.join(id.to_string());
        let tmp = self.dir.join(format!(".join-{id}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("joining the group"))?;
        // An owner re-joining its own group keeps its key and records.
        if dir.exists() {
            for f in ["ca.key"] {
                if dir.join(f).exists() {
                    std::fs::copy(dir.join(f), tmp.join(f)).map_err(io("joining the group"))?;
                }
            }
            if dir.join("issued").exists() {
                std::fs::rename(dir.join("issued"), tmp.join("issued"))
                    .map_err(io("joining the group"))?;
            }
        }
        write_file(&tmp.join("name"), name.as_bytes(), 0o644)?;
        write_file(
            &tmp.join("ca.pem"),
            pem("CERTIFICATE", ca_der).as_bytes(),
            0o644,
        )?;
        write_file(
            &tmp.join("member.pem"),
            pem("CERTIFICATE", member_der).as_bytes(),
            0o644,
        )?;
        if let Some(c) = &crl {
            write_file(&tmp.join("crl.pem"), pem("X509 CRL", c).as_bytes(), 0o644)?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(io("joining the group"))?;
        let g = Group::load(&dir)?;
        self.lock().insert(id, g);
        self.info(id)
    }

    /// Takes a group's CRL from anywhere: it replaces the one held only if
    /// the group CA signed it and its number is higher. `Ok(false)`: not newer.
    pub fn accept_crl(&self, id: GroupId, crl_der: &[u8]) -> Result<bool, GroupError> {
        let mut groups = self.lock();
        let g = groups
            .get_mut(&id)
            .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
        let (number, _) = crl_checked(crl_der, &g.ca_der)?;
        let held = g.crl_number();
        if number <= held {
            return Ok(false);
        }
        write_file(
            &g.dir.join("crl.pem"),
            pem("X509 CRL", crl_der).as_bytes(),
            0o644,
        )?;
        g.crl_der = Some(crl_der.to_vec());
        g.crl_number = number;
        Ok(true)
    }

    /// Takes a CRL (PEM or DER) the operator hands this node to pass on to
    /// group `id`'s members — how a CA kept outside any node revokes: it
    /// must be the group CA's and not older than the one held. From then on
    /// this node sends the group's CRL on as an owner does
    /// ([`GroupInfo::relays_crl`]). Returns the CRL now held (DER).
    pub fn relay_crl(&self, id: GroupId, crl: &[u8]) -> Result<Vec<u8>, GroupError> {
        let der = pki::crls_from_bytes(crl)?
            .into_iter()
            .next()
            .ok_or_else(|| GroupError::crl("no CRL in it"))?;
        let (ca, dir, held) = {
            let groups = self.lock();
            let g = groups
                .get(&id)
                .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
            (g.ca_der.clone(), g.dir.clone(), g.crl_number())
        };
        let (number, _) = crl_checked(&der, &ca)?;
        if number < held {
            return Err(GroupError::crl(format!(
                "its number {number} is older than the CRL held here ({held})"
            )));
        }
        if number == held && self.crl(id).as_deref() != Some(der.as_slice()) {
            return Err(GroupError::crl(format!(
                "it is numbered {number}, as the CRL held here, but differs from it: a CA numbers each new CRL higher (`openssl ca -gencrl` does)"
            )));
        }
        self.accept_crl(id, &der)?;
        write_file(&dir.join(RELAY_CRL), b"", 0o644)?;
        let mut groups = self.lock();
        let g = groups
            .get_mut(&id)
            .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
        g.relays_crl = true;
        g.crl_der
            .clone()
            .ok_or_else(|| GroupError::crl("no CRL held"))
    }

    /// The members the owner issued certificates to, with their status.
    pub fn members(&self, name_or_id: &str) -> Result<Vec<MemberInfo>, GroupError> {
        let id = self.resolve(name_or_id)?;
        let groups = self.lock();
        let g = groups
            .get(&id)
            .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
        if !g.owner {
            return Err(GroupError::NotOwner(g.name.clone()));
        }
        let revoked = match &g.crl_der {
            Some(c) => crl_checked(c, &g.ca_der)?.1,
            None => Vec::new(),
        };
        let mut out = Vec::new();
        let entries = std::fs::read_dir(g.dir.join("issued")).map_err(io("listing members"))?;
        for e in entries.flatten() {
            let Ok(bytes) = std::fs::read(e.path()) else {
                continue;
            };
            let Some(der) = pki::certs_from_bytes(&bytes)
                .ok()
                .and_then(|c| c.into_iter().next())
            else {
                continue;
            };
            let (not_before, not_after) = validity(&der)?;
            let serial = serial_of(&der)?;
            out.push(MemberInfo {
                peer: pki::peer_of(&der)
                    .map(|p| p.to_base58())
                    .unwrap_or_default(),
                serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
                not_before,
                not_after,
                revoked: revoked.contains(&serial),
            });
        }
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        Ok(out)
    }

    /// Whether `cert_der` proves `peer` a current member of group `id`: it
    /// chains to the group CA, is valid now, is not in the CRL held, and
    /// names `peer` (whom the connection it came on authenticated).
    pub fn verify_member(
        &self,
        id: GroupId,
        peer: &PeerId,
        cert_der: &[u8],
    ) -> Result<(), GroupError> {
        let trust = {
            let groups = self.lock();
            let g = groups
                .get(&id)
                .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
            g.trust()?
        };
        trust.verify_peer(
            &[cert_der.to_vec()],
            peer,
            self.clock.now(),
            KeyUsage::required_if_present(EKU_CLIENT_AUTH),
        )?;
        pki::certifies_key_of(cert_der, peer)?;
        Ok(())
    }

    /// Whether this node is itself a current member of group `id`.
    pub fn is_member(&self, id: GroupId) -> bool {
        self.own_certificate(id)
            .is_some_and(|c| self.verify_member(id, &self.local, &c).is_ok())
    }
}
