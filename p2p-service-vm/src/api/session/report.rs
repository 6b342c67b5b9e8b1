//! The session's state as admins see it (`ListSessions`) and as the app itself
//! asks for it (`SessionState`): a snapshot shared with the node's session
//! list, rewritten whenever the session gains or loses a protocol, topic,
//! service or stream.
//!
//! ```text
//!  protocols, registrations, stream_table, events ─► sync_state ─► SessionEntry::state
//!                                                                   ├─► ops ListSessions
//!                                                                   └─► SessionState answer
//! ```

use p2pvm_proto::pb;

use super::Session;
use crate::api::ApiError;

impl Session {
    /// Rewrites the shared snapshot from the session's own records.
    pub(in crate::api) fn sync_state(&self) {
        let mut st = self.state.lock().expect("lock");
        st.protocols = sorted(self.protocols.keys().cloned());
        st.topics = sorted(self.topics.iter().cloned());
        st.services = sorted(self.services.iter().cloned());
        st.streams = self.streams.ids();
        st.watching_events = self.watching;
    }

    pub(in crate::api) fn session_state(&self) -> Result<pb::response::Result, ApiError> {
        Ok(pb::response::Result::SessionState(
            self.state.lock().expect("lock").clone(),
        ))
    }
}

fn sorted(it: impl Iterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = it.collect();
    v.sort();
    v
}
