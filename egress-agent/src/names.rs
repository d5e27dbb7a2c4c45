//! Which host name each allowed address was last answered for, so deny events can name it.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

/// Address to host name, shared between the resolver side and the event reader.
#[derive(Debug, Clone, Default)]
pub struct Names(Arc<RwLock<HashMap<IpAddr, String>>>);

impl Names {
    /// Records that `ip` was answered for `host`.
    pub fn remember(&self, ip: IpAddr, host: String) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ip, host);
    }

    /// The host `ip` was last answered for.
    pub fn lookup(&self, ip: &IpAddr) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(ip)
            .cloned()
    }
}
