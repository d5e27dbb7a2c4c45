//! The resolver's handling of an upstream answer on arbitrary bytes: the addresses it grants
//! come only from the queried name's chain, and it never panics.
#![no_main]

use std::{str::FromStr as _, sync::LazyLock};

use egress_agent::dns::screen::answered_addresses;
use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RecordType},
};
use libfuzzer_sys::fuzz_target;

static QUERY: LazyLock<Message> = LazyLock::new(|| {
    let mut m = Message::new();
    m.set_id(0x1234).set_recursion_desired(true);
    m.add_query(Query::query(
        Name::from_str("ok.example.com.").expect("valid name"),
        RecordType::A,
    ));
    m.add_query(Query::query(
        Name::from_str("ok.example.com.").expect("valid name"),
        RecordType::AAAA,
    ));
    m
});

fuzz_target!(|data: &[u8]| {
    if let Ok(granted) = answered_addresses(&QUERY, data) {
        for (name, _) in granted {
            assert_eq!(name, "ok.example.com");
        }
    }
});
