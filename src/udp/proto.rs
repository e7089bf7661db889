//! UDP negotiation messages carried on the TLS control connection.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum UdpRequest {
    Start,
}

impl UdpRequest {
    pub fn kind_name(&self) -> &'static str {
        "start"
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum UdpResponse {
    Nothing,
}
