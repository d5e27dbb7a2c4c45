//! `unix:` rules: a unix socket bound outside the sandbox that a command under `run` may
//! connect or send to (a local daemon acting for it: a deputy). Without a rule, none.

use std::{fmt, path::PathBuf};

use serde::Deserialize;

/// Longest `sun_path` (108 bytes with the terminating NUL; an abstract name has no NUL but
/// its leading zero byte takes the same place).
pub const MAX_UNIX_PATH: usize = 107;

/// A unix socket a rule names: a path in the file system, or an abstract name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub enum UnixName {
    /// `/run/user/1000/ssh-agent.sock`: an absolute path, `.` and `..` free.
    Path(PathBuf),
    /// `@name`: an abstract name (the `@` stands for the leading zero byte), without it.
    Abstract(String),
}

impl fmt::Display for UnixName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Abstract(n) => write!(f, "@{n}"),
        }
    }
}

impl TryFrom<String> for UnixName {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::str::FromStr for UnixName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.contains('\0') {
            return Err(format!("{t:?}: a unix socket name has no NUL byte"));
        }
        if let Some(name) = t.strip_prefix('@') {
            if name.is_empty() {
                return Err("\"@\": give the abstract name after @".into());
            }
            if name.len() + 1 > MAX_UNIX_PATH + 1 {
                return Err(format!(
                    "{t:?} is longer than an abstract name can be ({} bytes)",
                    MAX_UNIX_PATH
                ));
            }
            return Ok(Self::Abstract(name.to_owned()));
        }
        if !t.starts_with('/') {
            return Err(format!(
                "{t:?} is not a unix socket: give an absolute path (/run/x.sock) or an abstract \
                 name (\"@name\")"
            ));
        }
        if t.len() > MAX_UNIX_PATH {
            return Err(format!(
                "{t:?} is longer than a unix socket path can be ({MAX_UNIX_PATH} bytes)"
            ));
        }
        if t.split('/').any(|c| c == "." || c == "..") || t.ends_with('/') {
            return Err(format!(
                "{t:?}: write the socket's path without . or .. and without a trailing /"
            ));
        }
        let mut clean = String::with_capacity(t.len());
        for c in t.split('/').filter(|c| !c.is_empty()) {
            clean.push('/');
            clean.push_str(c);
        }
        Ok(Self::Path(PathBuf::from(clean)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_abstract_names_parse() {
        assert_eq!(
            "/run/user/1000//ssh.sock".parse::<UnixName>(),
            Ok(UnixName::Path("/run/user/1000/ssh.sock".into()))
        );
        assert_eq!(
            "@/tmp/.X11-unix/X0".parse::<UnixName>(),
            Ok(UnixName::Abstract("/tmp/.X11-unix/X0".into()))
        );
        assert_eq!(UnixName::Abstract("dbus-x".into()).to_string(), "@dbus-x");
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        for (bad, says) in [
            ("run/x.sock", "absolute path"),
            ("@", "after @"),
            ("/run/../etc/x", "without . or .."),
            ("/run/x/", "trailing /"),
        ] {
            let e = bad.parse::<UnixName>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let long = format!("/{}", "a".repeat(MAX_UNIX_PATH));
        assert!(long.parse::<UnixName>().unwrap_err().contains("longer"));
    }
}
