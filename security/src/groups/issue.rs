//! Issuing: what a group's owner does with its CA key (create the group,
//! invite a peer by issuing its member certificate, revoke members with a
//! CRL whose number only grows), and the X.509 this takes.

use super::*;

/// A certificate signing request (PEM) for the node `peer` whose libp2p
/// Ed25519 key is `key_pkcs8`: what an operator whose group CA is kept
/// elsewhere (the `openssl` CLI, say) signs into this node's member
/// certificate. It names the peer (URI SAN) and is signed by the node's key,
/// the key the certificate must certify.
pub fn certificate_request(node_key: &libp2p_identity::Keypair) -> Result<String, GroupError> {
    let peer = node_key.public().to_peer_id();
    let pkcs8 = pki::node_key_pkcs8(node_key).ok_or_else(|| {
        GroupError::cannot_make("a certificate request: the node key is not an Ed25519 key")
    })?;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_slice());
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519).map_err(make)?;
    let p = member_params(&peer)?;
    p.serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(make)
}

/// What every member certificate (and request for one) says: the member's
/// name and its peer id as a URI SAN.
pub(super) fn member_params(peer: &PeerId) -> Result<CertificateParams, GroupError> {
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, format!("member {peer}"));
    p.subject_alt_names = vec![SanType::URI(
        format!("{}{peer}", pki::PEER_URI_PREFIX)
            .try_into()
            .map_err(make)?,
    )];
    Ok(p)
}

/// PEM text of `der` under `label`.
pub(super) fn pem(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// A peer's Ed25519 public key, as rcgen signs a certificate for it.
struct PeerKey([u8; 32]);

impl rcgen::PublicKeyData for PeerKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// The parameters of this node's CA for group `name`, valid from `from`
/// until `until` (unix seconds). Rebuilt from the name and the certificate's
/// validity, they give the same subject and key identifier: what rcgen needs
/// to sign as that CA again.
pub(super) fn ca_params(
    name: &str,
    from: u64,
    until: u64,
) -> Result<CertificateParams, GroupError> {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name
        .push(DnType::OrganizationName, "p2pvm trusted group");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = KeyIdMethod::Sha256;
    p.not_before = at(from)?;
    p.not_after = at(until)?;
    Ok(p)
}

impl Groups {
    /// Creates a group this node owns (and is the first member of), its CA
    /// valid for `valid_secs`.
    pub fn create(&self, name: &str, valid_secs: u64) -> Result<GroupInfo, GroupError> {
        if !valid_name(name) {
            return Err(GroupError::BadName(name.into()));
        }
        if self.lock().values().any(|g| g.name == name) {
            return Err(GroupError::Exists(name.into()));
        }
        let key = KeyPair::generate().map_err(make)?;
        let now = self.clock.now();
        let ca = ca_params(name, now - 60, now + valid_secs)?
            .self_signed(&key)
            .map_err(make)?;
        let ca_der = ca.der().to_vec();
        let id = group_id(&ca_der)?;
        // Written under a temporary name and renamed: a crash leaves no half
        // group behind.
        let tmp = self.dir.join(format!(".new-{id}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("issued")).map_err(io("creating the group"))?;
        write_file(&tmp.join("name"), name.as_bytes(), 0o644)?;
        write_file(
            &tmp.join("ca.pem"),
            pem("CERTIFICATE", &ca_der).as_bytes(),
            0o644,
        )?;
        write_file(&tmp.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
        let dir = self.dir.join(id.to_string());
        std::fs::rename(&tmp, &dir).map_err(io("creating the group"))?;
        let g = Group::load(&dir)?;
        self.lock().insert(id, g);
        // The first topic key (epoch 0: no CRL yet).
        self.sign_epoch(id, 0)?;
        // The owner is a member like any other.
        let own = self.issue(id, &self.local, valid_secs)?;
        write_file(
            &dir.join("member.pem"),
            pem("CERTIFICATE", &own).as_bytes(),
            0o644,
        )?;
        if let Some(g) = self.lock().get_mut(&id) {
            g.member_der = Some(own);
        }
        self.info(id)
    }

    /// Issues a member certificate for `peer`, valid for `valid_secs`.
    pub(super) fn issue(
        &self,
        id: GroupId,
        peer: &PeerId,
        valid_secs: u64,
    ) -> Result<Vec<u8>, GroupError> {
        let (issuer, dir) = {
            let groups = self.lock();
            let g = groups
                .get(&id)
                .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
            (g.issuer()?, g.dir.clone())
        };
        let (ca, ca_key) = issuer;
        // The certificate is for the peer's own Ed25519 key (its id carries
        // it): the member holds the private key, so the certificate is a
        // credential it can prove, not only a name.
        let key = p2pvm_content::inline_public_key(peer)
            .and_then(|k| k.try_into_ed25519().ok())
            .map(|k| PeerKey(k.to_bytes()))
            .ok_or_else(|| {
                GroupError::Invitation(format!(
                    "peer {peer} does not carry an Ed25519 key in its id"
                ))
            })?;
        let now = self.clock.now();
        let mut p = member_params(peer)?;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        // Random, positive, unique: what a CRL names a certificate by.
        let mut serial: [u8; 16] = rand::random();
        serial[0] = (serial[0] & 0x7f) | 0x01;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.not_before = at(now - 60)?;
        p.not_after = at(now + valid_secs)?;
        let cert = p.signed_by(&key, &ca, &ca_key).map_err(make)?;
        let der = cert.der().to_vec();
        write_file(
            &dir.join("issued").join(format!("{peer}.pem")),
            pem("CERTIFICATE", &der).as_bytes(),
            0o644,
        )?;
        Ok(der)
    }

    /// Invites `peer` into the group `name_or_id` (owner only): an
    /// invitation (PEM: the group CA, the member certificate, the current
    /// CRL) that peer imports with [`Groups::join`].
    pub fn invite(
        &self,
        name_or_id: &str,
        peer: &PeerId,
        valid_secs: u64,
    ) -> Result<String, GroupError> {
        let id = self.resolve(name_or_id)?;
        let member = self.issue(id, peer, valid_secs)?;
        let groups = self.lock();
        let g = groups
            .get(&id)
            .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
        let mut out = format!(
            "# p2pvm group invitation: group {} ({id}) for peer {peer}\n",
            g.name
        );
        out.push_str(&pem("CERTIFICATE", &g.ca_der));
        out.push_str(&pem("CERTIFICATE", &member));
        if let Some(crl) = &g.crl_der {
            out.push_str(&pem("X509 CRL", crl));
        }
        Ok(out)
    }

    /// Revokes every certificate `peer` holds in the group (owner only):
    /// a new CRL, numbered one above the last, replaces the group's. Returns
    /// it (DER), for distribution to members.
    pub fn revoke(&self, name_or_id: &str, peer: &PeerId) -> Result<Vec<u8>, GroupError> {
        let id = self.resolve(name_or_id)?;
        let (issuer, dir, held, number) = {
            let groups = self.lock();
            let g = groups
                .get(&id)
                .ok_or_else(|| GroupError::Unknown(id.to_string()))?;
            let held = match &g.crl_der {
                Some(c) => crl_checked(c, &g.ca_der)?.1,
                None => Vec::new(),
            };
            (g.issuer()?, g.dir.clone(), held, g.crl_number())
        };
        let issued = dir.join("issued").join(format!("{peer}.pem"));
        let cert = std::fs::read(&issued).map_err(|_| GroupError::NotInvited(peer.to_string()))?;
        let serial = serial_of(&pki::certs_from_bytes(&cert)?[0])?;
        let now = self.clock.now();
        let mut revoked: Vec<Vec<u8>> = held;
        if !revoked.contains(&serial) {
            revoked.push(serial);
        }
        let (ca, ca_key) = issuer;
        let crl = CertificateRevocationListParams {
            this_update: at(now - 1)?,
            next_update: at(now + 30 * 86_400)?,
            crl_number: SerialNumber::from(number + 1),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| -> Result<RevokedCertParams, GroupError> {
                    Ok(RevokedCertParams {
                        serial_number: SerialNumber::from_slice(s),
                        revocation_time: at(now - 1)?,
                        reason_code: None,
                        invalidity_date: None,
                    })
                })
                .collect::<Result<_, _>>()?,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca, &ca_key)
        .map_err(make)?;
        let der = crl.der().to_vec();
        // The CRL first, then the new epoch's key: a key exists only for an
        // epoch whose CRL is current, so members refuse it to the revoked
        // peer from the moment it exists. (A crash in between leaves the
        // epoch unsigned; the owner signs it when it opens the group.)
        self.accept_crl(id, &der)?;
        self.sign_epoch(id, number + 1)?;
        Ok(der)
    }
}
