//! `/p2pvm/compute/1`: what requester and provider say on one stream.
//!
//! ```text
//!  requester                              provider
//!   GetOffer ───────────────────────────►
//!            ◄─────────────────────────── Offer | Failed
//!  (or, on a stream of its own:)
//!   Run{job, module, input, fuel, price} ►  fetch (verified, scanned), compile, run, publish
//!            ◄─────────────────────────── Done{receipt signed by the provider}
//!                                       | OutOfFuel{receipt for the fuel burnt, no result}
//!                                       | Failed{code}
//!   Verdict{countersigned receipt | why not} ►  receipt checked and stored
//!            ◄─────────────────────────── Ack
//! ```
//!
//! Closing the stream before the verdict cancels the run. Messages are
//! length-prefixed protobuf, at most 64 KiB (see `content::wire`).

use prost::{Message, Oneof};

/// The protocol name.
pub const PROTOCOL: &str = "/p2pvm/compute/1";
/// The service name providers announce in the DHT service registry.
pub const SERVICE: &str = "p2pvm-compute";

/// A provider's terms.
#[derive(Clone, PartialEq, Message)]
pub struct Offer {
    /// A job's linear memory, at most.
    #[prost(uint64, tag = "1")]
    pub max_memory_bytes: u64,
    /// A job's wall-clock time, at most.
    #[prost(uint64, tag = "2")]
    pub max_wall_ms: u64,
    /// A job's fuel, at most.
    #[prost(uint64, tag = "3")]
    pub max_fuel: u64,
    /// Credits per million fuel.
    #[prost(uint64, tag = "4")]
    pub price_per_mfuel: u64,
    /// Jobs run at once.
    #[prost(uint32, tag = "5")]
    pub max_jobs: u32,
    /// Jobs running now.
    #[prost(uint32, tag = "6")]
    pub running: u32,
}

/// Run a job.
#[derive(Clone, PartialEq, Message)]
pub struct Run {
    /// 16 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub job_id: Vec<u8>,
    /// Content id (hex) of the module.
    #[prost(string, tag = "2")]
    pub module_id: String,
    /// Content id (hex) of the input; empty for none.
    #[prost(string, tag = "3")]
    pub input_id: String,
    /// The most fuel the requester pays for.
    #[prost(uint64, tag = "4")]
    pub max_fuel: u64,
    /// The price the requester accepted (the provider's offer when asked).
    #[prost(uint64, tag = "5")]
    pub price_per_mfuel: u64,
    /// The requester's public key (libp2p protobuf encoding): the receipt
    /// names it, and it must be the key of the peer on the stream.
    #[prost(bytes = "vec", tag = "6")]
    pub requester_key: Vec<u8>,
}

/// The requester's decision on a run's result.
#[derive(Clone, PartialEq, Message)]
pub struct Verdict {
    /// The receipt countersigned (encoded `SignedReceipt`); empty when not paid.
    #[prost(bytes = "vec", tag = "1")]
    pub receipt: Vec<u8>,
    /// Why not paid.
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// Requester → provider.
#[derive(Clone, PartialEq, Message)]
pub struct Request {
    /// What.
    #[prost(oneof = "Ask", tags = "1, 2, 3")]
    pub ask: Option<Ask>,
}

/// Requester → provider, one of.
#[derive(Clone, PartialEq, Oneof)]
pub enum Ask {
    /// The offer now in force.
    #[prost(message, tag = "1")]
    GetOffer(Offer),
    /// Run a job.
    #[prost(message, tag = "2")]
    Run(Run),
    /// Paid or not.
    #[prost(message, tag = "3")]
    Verdict(Verdict),
}

/// A run that did not produce a result.
#[derive(Clone, PartialEq, Message)]
pub struct Failed {
    /// An API error code name (`COMPUTE_OUT_OF_FUEL`, `UNAVAILABLE`, ...).
    #[prost(string, tag = "1")]
    pub code: String,
    /// Details.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// Provider → requester.
#[derive(Clone, PartialEq, Message)]
pub struct Response {
    /// What.
    #[prost(oneof = "Answer", tags = "1, 2, 3, 4, 5")]
    pub answer: Option<Answer>,
}

/// Provider → requester, one of.
#[derive(Clone, PartialEq, Oneof)]
pub enum Answer {
    /// The offer.
    #[prost(message, tag = "1")]
    Offer(Offer),
    /// The result: an encoded `SignedReceipt` with the provider's signature.
    #[prost(bytes, tag = "2")]
    Done(Vec<u8>),
    /// No result.
    #[prost(message, tag = "3")]
    Failed(Failed),
    /// The verdict was taken.
    #[prost(message, tag = "4")]
    Ack(Failed),
    /// The run used all the fuel it was given and has no result: an encoded
    /// `SignedReceipt` for that fuel, with an empty result id. The
    /// requester pays it when the job's runs agree it needs more (fuel is
    /// deterministic), so a budget sized to run out buys no free work.
    #[prost(bytes, tag = "5")]
    OutOfFuel(Vec<u8>),
}

impl Response {
    pub(crate) fn failed(code: &str, message: impl Into<String>) -> Self {
        Self {
            answer: Some(Answer::Failed(Failed {
                code: code.into(),
                message: message.into(),
            })),
        }
    }
}
