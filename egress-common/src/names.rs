//! Name binding keys (issue 13): the names host rules permit, in a form one longest-prefix
//! lookup can match, exact names and `*.` wildcards alike.
//!
//! A name is stored reversed (`api.example.com` → `moc.elpmaxe.ipa`), lower-cased, without
//! its trailing dot: a wildcard's suffix is then a *prefix* of every name below it. An exact
//! name ends with a 0 byte (so it matches itself only), a wildcard `*.example.com` with the
//! dot (`moc.elpmaxe.`: every name below `example.com` at any depth, not `example.com`
//! itself). The lookup key is the judged name reversed plus its 0 byte. The prefix length is
//! in bits, as the LPM trie counts it.

/// Bytes of a name key: 253 name bytes and the terminator fit.
pub const NAME_KEY_BYTES: usize = 256;

/// The data of a `NAMES` key (see the module documentation).
pub type NameBytes = [u8; NAME_KEY_BYTES];

/// Byte that ends an exact name's key.
pub const EXACT_END: u8 = 0;
/// Byte that ends a wildcard's key (the label boundary).
pub const WILDCARD_END: u8 = b'.';

#[cfg(feature = "user")]
mod user {
    use super::{EXACT_END, NAME_KEY_BYTES, NameBytes, WILDCARD_END};

    /// The key of a host rule's name: `wildcard` for `*.name`. `None` if it is too long.
    pub fn name_key(name: &str, wildcard: bool) -> Option<(u32, NameBytes)> {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.len() + 1 > NAME_KEY_BYTES {
            return None;
        }
        let mut data = [0u8; NAME_KEY_BYTES];
        for (d, b) in data.iter_mut().zip(name.bytes().rev()) {
            *d = b.to_ascii_lowercase();
        }
        data[name.len()] = if wildcard { WILDCARD_END } else { EXACT_END };
        Some((((name.len() + 1) * 8) as u32, data))
    }
}

#[cfg(feature = "user")]
pub use user::name_key;

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;

    #[test]
    fn names_are_reversed_and_terminated() {
        let (len, k) = name_key("Api.Example.com.", false).unwrap();
        assert_eq!(len, 16 * 8);
        assert_eq!(&k[..16], b"moc.elpmaxe.ipa\0");
        let (len, w) = name_key("example.com", true).unwrap();
        assert_eq!(len, 12 * 8);
        assert_eq!(&w[..12], b"moc.elpmaxe.");
        // The wildcard's bits are a prefix of a name below it, not of the apex.
        let (_, below) = name_key("a.b.example.com", false).unwrap();
        assert_eq!(&below[..12], &w[..12]);
        let (_, apex) = name_key("example.com", false).unwrap();
        assert_ne!(&apex[..12], &w[..12]);
        assert!(name_key(&"a".repeat(256), false).is_none());
    }
}
