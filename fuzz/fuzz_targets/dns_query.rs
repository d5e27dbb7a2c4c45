//! The resolver's handling of a client's query on arbitrary bytes: drop, answer at once,
//! refuse or forward; never panic. A forwarded query's names must all be permitted.
//! Screened with Kubernetes-like search domains, so that the NXDOMAIN path is reached too.
#![no_main]

use std::{path::Path, sync::LazyLock};

use egress_agent::{
    policy::{self, Policy},
    dns::{
        answer::normalize,
        screen::{Screened, screen},
    },
};
use libfuzzer_sys::fuzz_target;

static POLICY: LazyLock<Policy> = LazyLock::new(|| {
    policy::parse_str(
        "version: 1\nallow:\n  - host: ok.example.com\n    ports: [443]\n  \
         - host: \"*.wild.example.com\"\n  - cidr: 192.0.2.0/24\n",
        Path::new("fuzz.yaml"),
    )
    .expect("the fuzz policy is valid")
});

static SEARCH: LazyLock<Vec<String>> = LazyLock::new(|| {
    [
        "default.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
    ]
    .map(String::from)
    .to_vec()
});

fuzz_target!(|data: &[u8]| {
    if let Screened::Forward(msg) = screen(data, &POLICY, &SEARCH) {
        for q in msg.queries() {
            assert!(
                !POLICY.host_rules_for(&normalize(q.name())).is_empty(),
                "forwarded a name no rule permits: {}",
                q.name()
            );
        }
    }
});
