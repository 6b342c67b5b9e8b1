//! The DHT as a key-value store: records, and the providers announced for
//! a key.

use bytes::Bytes;
use p2pvm_proto::pb;
use pb::request::Op;

use super::Client;
use crate::error::Result;

impl Client {
    /// Stores a value in the DHT.
    ///
    /// ```no_run
    /// # async fn f(c: guest_api::Client) -> guest_api::Result<()> {
    /// c.put_record(b"greeting", b"hello").await?;
    /// assert_eq!(&c.get_record(b"greeting").await?.value[..], b"hello");
    /// # Ok(()) }
    /// ```
    pub async fn put_record(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.ok(Op::PutRecord(pb::PutRecordRequest {
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            timeout_ms: 0,
        }))
        .await
    }

    /// Fetches a value from the DHT.
    pub async fn get_record(&self, key: &[u8]) -> Result<pb::Record> {
        let op = Op::GetRecord(pb::GetRecordRequest {
            key: Bytes::copy_from_slice(key),
            timeout_ms: 0,
        });
        self.call(op, reply!(Record)).await
    }

    /// Announces this node as a provider of `key`.
    pub async fn provide(&self, key: &[u8]) -> Result<()> {
        self.ok(Op::Provide(pb::ProvideRequest {
            key: Bytes::copy_from_slice(key),
            timeout_ms: 0,
        }))
        .await
    }

    /// Finds up to `limit` providers of `key` (0 = node default).
    pub async fn find_providers(&self, key: &[u8], limit: u32) -> Result<Vec<String>> {
        let op = Op::FindProviders(pb::FindProvidersRequest {
            key: Bytes::copy_from_slice(key),
            limit,
            timeout_ms: 0,
        });
        let list = self.call(op, reply!(Providers)).await?;
        Ok(list.peers.into_iter().map(|p| p.peer_id).collect())
    }
}
