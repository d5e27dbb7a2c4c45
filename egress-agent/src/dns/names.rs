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
    pub fn remember(&self, ip: IpAddr, host: &str) {
        if self.lookup_is(&ip, host) {
            return;
        }
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ip, host.to_owned());
    }

    /// Whether `ip` was last answered for `host` (a read lock only: the common case).
    fn lookup_is(&self, ip: &IpAddr, host: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(ip)
            .is_some_and(|h| h == host)
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
