//! The allowlist parser on arbitrary text: it must return a policy or an error, never panic,
//! and a policy it accepts must compile into kernel entries or fail with an error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Includes resolve against a folder that does not exist: nothing outside is read.
    if let Ok(policy) =
        egress_agent::policy::parse_str(text, Path::new("/nonexistent-egress-fuzz/fuzz.yaml"))
    {
        let _ = egress_agent::policy::cidr_entries(&policy);
        let _ = policy.summary();
        for name in ["example.com", "a.example.com", "x"] {
            let rules = policy.host_rules_for(name);
            let _ = egress_agent::policy::rule_value(&rules, 0);
        }
    }
});
