//! Receipts: what a completed job paid, signed by both nodes.
//!
//! The provider signs the body when it answers with its result; the
//! requester countersigns once the result agreed with the majority. Each
//! signature covers a domain-separated prefix and the body's exact bytes, so a
//! signature made for anything else (or for the other role) cannot be
//! replayed as one. The body carries both public keys: any node can check a
//! receipt with nothing but the receipt.

use libp2p_identity::{Keypair, PeerId, PublicKey};
use prost::Message;

/// What the provider signs.
const PROVIDER_DOMAIN: &[u8] = b"p2pvm/compute/receipt/v1/provider\0";
/// What the requester signs.
const REQUESTER_DOMAIN: &[u8] = b"p2pvm/compute/receipt/v1/requester\0";

/// A job's id: 16 random bytes chosen by the requester.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub [u8; 16]);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for JobId {
    type Err = ReceiptError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ReceiptError::Malformed(format!("job id {s:?} is not 32 hex digits"));
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(id))
    }
}

impl TryFrom<&[u8]> for JobId {
    type Error = ReceiptError;
    fn try_from(b: &[u8]) -> Result<Self, Self::Error> {
        b.try_into()
            .map(Self)
            .map_err(|_| ReceiptError::Malformed("job id is not 16 bytes".into()))
    }
}

/// Why a receipt was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// Undecodable, or a field out of shape.
    #[error("malformed receipt: {0}")]
    Malformed(String),
    /// A signature does not verify.
    #[error("receipt signature of the {0} does not verify")]
    BadSignature(&'static str),
    /// The key given is not the one the receipt names.
    #[error("receipt names another {0}")]
    WrongParty(&'static str),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Signing(String),
}

/// The signed facts of one completed job run.
#[derive(Clone, PartialEq, Message)]
pub struct ReceiptBody {
    /// [`JobId`] bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub job_id: Vec<u8>,
    /// Content id (hex) of the module.
    #[prost(string, tag = "2")]
    pub module_id: String,
    /// Content id (hex) of the input; empty for none.
    #[prost(string, tag = "3")]
    pub input_id: String,
    /// The requester's public key (libp2p protobuf encoding).
    #[prost(bytes = "vec", tag = "4")]
    pub requester_key: Vec<u8>,
    /// The provider's public key.
    #[prost(bytes = "vec", tag = "5")]
    pub provider_key: Vec<u8>,
    /// Fuel the run used.
    #[prost(uint64, tag = "6")]
    pub work_units: u64,
    /// Credits the requester pays the provider.
    #[prost(uint64, tag = "7")]
    pub credits: u64,
    /// Content id (hex) of the output.
    #[prost(string, tag = "8")]
    pub result_id: String,
    /// Unix seconds when the run finished.
    #[prost(uint64, tag = "9")]
    pub completed_unix: u64,
}

/// A body with its signatures, as it travels and is stored.
#[derive(Clone, PartialEq, Message)]
pub struct SignedReceipt {
    /// The encoded [`ReceiptBody`], exactly as signed.
    #[prost(bytes = "vec", tag = "1")]
    pub body: Vec<u8>,
    /// The provider's signature.
    #[prost(bytes = "vec", tag = "2")]
    pub provider_sig: Vec<u8>,
    /// The requester's signature (empty until countersigned).
    #[prost(bytes = "vec", tag = "3")]
    pub requester_sig: Vec<u8>,
}

/// A receipt whose two signatures verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    /// BLAKE3 of the encoded body.
    pub id: [u8; 32],
    /// Its facts.
    pub body: ReceiptBody,
    /// Who asked for the job.
    pub requester: PeerId,
    /// Who ran it.
    pub provider: PeerId,
    /// The job.
    pub job: JobId,
    /// What is stored and shown.
    pub signed: SignedReceipt,
}

/// Credits for `work_units` of fuel at `price_per_mfuel` credits per million,
/// rounded up (a run that did any work costs at least one credit at a
/// non-zero price).
pub fn credits_for(work_units: u64, price_per_mfuel: u64) -> u64 {
    let c = (work_units as u128 * price_per_mfuel as u128).div_ceil(1_000_000);
    u64::try_from(c).unwrap_or(u64::MAX)
}

fn sign(key: &Keypair, domain: &[u8], body: &[u8]) -> Result<Vec<u8>, ReceiptError> {
    key.sign(&[domain, body].concat())
        .map_err(|e| ReceiptError::Signing(e.to_string()))
}

fn key_of(bytes: &[u8], role: &'static str) -> Result<PublicKey, ReceiptError> {
    PublicKey::try_decode_protobuf(bytes)
        .map_err(|e| ReceiptError::Malformed(format!("{role} key: {e}")))
}

impl ReceiptBody {
    /// The provider's half: `key` must be the body's provider key.
    pub fn sign_as_provider(&self, key: &Keypair) -> Result<SignedReceipt, ReceiptError> {
        if key.public().encode_protobuf() != self.provider_key {
            return Err(ReceiptError::WrongParty("provider"));
        }
        let body = self.encode_to_vec();
        Ok(SignedReceipt {
            provider_sig: sign(key, PROVIDER_DOMAIN, &body)?,
            body,
            requester_sig: Vec::new(),
        })
    }
}

impl SignedReceipt {
    /// Decodes the body and checks the provider's signature: what a
    /// requester does before comparing results and countersigning.
    pub fn provider_signed(&self) -> Result<ReceiptBody, ReceiptError> {
        let body = ReceiptBody::decode(self.body.as_slice())
            .map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        let provider = key_of(&body.provider_key, "provider")?;
        if !provider.verify(&[PROVIDER_DOMAIN, &self.body].concat(), &self.provider_sig) {
            return Err(ReceiptError::BadSignature("provider"));
        }
        JobId::try_from(body.job_id.as_slice())?;
        Ok(body)
    }

    /// The requester's half, after checking the provider's: `key` must be
    /// the body's requester key.
    pub fn countersign(mut self, key: &Keypair) -> Result<Receipt, ReceiptError> {
        let body = self.provider_signed()?;
        if key.public().encode_protobuf() != body.requester_key {
            return Err(ReceiptError::WrongParty("requester"));
        }
        self.requester_sig = sign(key, REQUESTER_DOMAIN, &self.body)?;
        Receipt::verify(self)
    }
}

impl Receipt {
    /// Checks both signatures of `signed`.
    pub fn verify(signed: SignedReceipt) -> Result<Self, ReceiptError> {
        let body = signed.provider_signed()?;
        let requester = key_of(&body.requester_key, "requester")?;
        if !requester.verify(
            &[REQUESTER_DOMAIN, &signed.body].concat(),
            &signed.requester_sig,
        ) {
            return Err(ReceiptError::BadSignature("requester"));
        }
        let provider = key_of(&body.provider_key, "provider")?.to_peer_id();
        Ok(Self {
            id: *blake3::hash(&signed.body).as_bytes(),
            job: JobId::try_from(body.job_id.as_slice())?,
            requester: requester.to_peer_id(),
            provider,
            body,
            signed,
        })
    }

    /// Decodes and checks a stored or received receipt.
    pub fn decode(bytes: &[u8]) -> Result<Self, ReceiptError> {
        let signed =
            SignedReceipt::decode(bytes).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        Self::verify(signed)
    }

    /// Its id in hex.
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(requester: &Keypair, provider: &Keypair) -> ReceiptBody {
        ReceiptBody {
            job_id: vec![7; 16],
            module_id: "aa".repeat(32),
            input_id: "bb".repeat(32),
            requester_key: requester.public().encode_protobuf(),
            provider_key: provider.public().encode_protobuf(),
            work_units: 2_500_000,
            credits: credits_for(2_500_000, 3),
            result_id: "cc".repeat(32),
            completed_unix: 1_700_000_000,
        }
    }

    #[test]
    fn both_parties_sign_and_anyone_verifies() {
        let (req, prov) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let half = body(&req, &prov).sign_as_provider(&prov).unwrap();
        let receipt = half.countersign(&req).unwrap();
        assert_eq!(receipt.requester, req.public().to_peer_id());
        assert_eq!(receipt.provider, prov.public().to_peer_id());
        assert_eq!(receipt.body.credits, 8);
        let again = Receipt::decode(&receipt.signed.encode_to_vec()).unwrap();
        assert_eq!(again, receipt);
    }

    #[test]
    fn no_node_signs_both_halves() {
        let (req, prov, mallory) = (
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
        );
        // Mallory cannot sign as the provider or countersign as the requester.
        assert_eq!(
            body(&req, &prov).sign_as_provider(&mallory),
            Err(ReceiptError::WrongParty("provider"))
        );
        let half = body(&req, &prov).sign_as_provider(&prov).unwrap();
        assert_eq!(
            half.clone().countersign(&mallory),
            Err(ReceiptError::WrongParty("requester"))
        );
        // A provider-only receipt is not a receipt.
        assert_eq!(
            Receipt::verify(half.clone()),
            Err(ReceiptError::BadSignature("requester"))
        );
        // The requester's own signature in the provider's place fails.
        let mut forged = half.clone();
        forged.requester_sig = sign(&req, REQUESTER_DOMAIN, &forged.body).unwrap();
        forged.provider_sig = sign(&req, PROVIDER_DOMAIN, &forged.body).unwrap();
        assert_eq!(
            Receipt::verify(forged),
            Err(ReceiptError::BadSignature("provider"))
        );
    }

    #[test]
    fn a_changed_body_fails_both_signatures() {
        let (req, prov) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let mut receipt = body(&req, &prov)
            .sign_as_provider(&prov)
            .unwrap()
            .countersign(&req)
            .unwrap()
            .signed;
        let mut b = ReceiptBody::decode(receipt.body.as_slice()).unwrap();
        b.credits *= 10;
        receipt.body = b.encode_to_vec();
        assert_eq!(
            Receipt::verify(receipt),
            Err(ReceiptError::BadSignature("provider"))
        );
        assert!(matches!(
            Receipt::decode(b"\xff\xff not a receipt"),
            Err(ReceiptError::Malformed(_))
        ));
    }

    #[test]
    fn bit_flips_never_yield_another_valid_receipt() {
        let (req, prov) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let receipt = body(&req, &prov)
            .sign_as_provider(&prov)
            .unwrap()
            .countersign(&req)
            .unwrap();
        let bytes = receipt.signed.encode_to_vec();
        // One bit of every byte, a different bit in each of eight neighbours
        // (every bit would take a minute of signature checks in a debug build).
        for byte in 0..bytes.len() {
            let bit = byte * 8 + byte % 8;
            let mut b = bytes.clone();
            b[byte] ^= 1 << (byte % 8);
            // Either refused, or (a flip in protobuf framing that decodes the
            // same) exactly the receipt that was signed.
            if let Ok(r) = Receipt::decode(&b) {
                assert_eq!((r.id, &r.body), (receipt.id, &receipt.body), "bit {bit}");
            }
        }
    }

    #[test]
    fn credits_round_up() {
        assert_eq!(credits_for(0, 5), 0);
        assert_eq!(credits_for(1, 1), 1);
        assert_eq!(credits_for(1_000_000, 1), 1);
        assert_eq!(credits_for(1_000_001, 1), 2);
        assert_eq!(credits_for(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn job_ids_round_trip() {
        let id = JobId([0xab; 16]);
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
        assert!("xyz".parse::<JobId>().is_err());
    }
}
