//! Sync-engine wire messages.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum SyncRequest {
    IndexSince { since: u64 },
}

impl SyncRequest {
    pub fn kind_name(&self) -> &'static str {
        match self {
            SyncRequest::IndexSince { .. } => "index-since",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum SyncResponse {
    Nothing,
}
