//! One YAML document read into serde types by `serde-saphyr`, with every error pinned on
//! file position and field path: `allow[2].ports[1]`.
//!
//! `serde-saphyr` gives each error the line and column of the node being read, rejects
//! duplicate keys and extra documents, and bounds what a document may cost ([`options`]);
//! [`Spanned`] fields keep the position of values that checks made after deserializing
//! (`load.rs`) point at. `serde_path_to_error` tracks the field path. What is ours is the
//! wording: serde's messages are reworded here so they read like the rest of the agent's
//! (`unknown field "prot", expected one of host, cidr, ...`).

use std::fmt;

use serde::{
    Deserialize, Deserializer,
    de::{DeserializeOwned, MapAccess, SeqAccess, Visitor},
};
use serde_path_to_error::Segment;
use serde_saphyr::{
    DefaultMessageFormatter, DuplicateKeyPolicy, Error as YamlError, Location, MergeKeyPolicy,
    MessageFormatter, NonFiniteFloatPolicy, Options,
};

pub use serde_saphyr::Spanned;

/// The largest allowlist file: 64 MiB, some ten times a file of 100,000 rules.
pub const MAX_BYTES: usize = 64 << 20;

/// The deepest nesting read; a valid file nests 5 levels (`allow`, a rule, `ports`, an item).
const MAX_DEPTH: usize = 16;

/// How many parser events aliases may replay in all: a bound against "billion laughs"
/// documents (an anchored list of 10 lists of 10 ... of 10 items).
const MAX_ALIASED: usize = 100_000;

/// The field `Spanned<T>` shows serde its value under; not a field of the format.
const SPANNED_VALUE: &str = "value";

/// A document that could not be read, and where.
#[derive(Debug)]
pub struct Error {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
    /// The field path (`allow[2].cidr`); empty for the document and for syntax errors.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// Whether the text is not well-formed YAML (rather than not a valid allowlist).
    pub syntax: bool,
}

/// The parser's settings: YAML 1.2 booleans only, `.inf` and `.nan` read as words (a port or a
/// duration rejects them as it rejects any word), no merge keys (`<<` is a key like any other,
/// so an unknown field), duplicate keys rejected, and budgets that admit a file of a million
/// rules but no alias bomb or deep nesting.
fn options() -> Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            max_events: 64 << 20,
            max_nodes: 32 << 20,
            max_total_scalar_bytes: MAX_BYTES,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_ALIASED,
        },
        duplicate_keys: DuplicateKeyPolicy::Error,
        merge_keys: MergeKeyPolicy::AsOrdinary,
        strict_booleans: true,
        non_finite_float_policy: NonFiniteFloatPolicy::AsString,
        with_snippet: false,
    }
}

/// Reads one document into `T`. An empty document (or one of comments only) reads as an
/// empty mapping at 1:1.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    if text.len() > MAX_BYTES {
        return Err(Error {
            line: 1,
            column: 1,
            field: String::new(),
            message: format!(
                "{} bytes, more than the {MAX_BYTES} a file may have",
                text.len()
            ),
            syntax: true,
        });
    }
    if let Ok(value) = serde_saphyr::from_str_with_options(text, options()) {
        return Ok(value);
    }
    // Read again for the error, tracking the field path: that doubles the time a read takes,
    // so only a file with an error pays it.
    let mut path = None;
    let read = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = steps(e.path(), e.inner());
            e.into_inner()
        })
    });
    match read {
        Ok(value) => Ok(value),
        Err(YamlError::Eof { .. }) if path.as_ref().is_none_or(Vec::is_empty) => from_str("{}"),
        Err(e) => Err(error(&e, path, text)),
    }
}

/// The position of a [`Spanned`] value: line and column from 1.
pub fn position<T>(value: &Spanned<T>) -> (usize, usize) {
    at(value.referenced)
}

fn at(location: Location) -> (usize, usize) {
    let n = |n: u64| usize::try_from(n).unwrap_or(usize::MAX).max(1);
    (n(location.line()), n(location.column()))
}

/// One step of a field path.
#[derive(Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// The steps of serde's path, without those `Spanned` adds; `None` when the error comes from
/// below serde (the parser: a syntax error, a duplicate key). An unknown field is reported at
/// its mapping.
fn steps(path: &serde_path_to_error::Path, error: &YamlError) -> Option<Vec<Step>> {
    let mut segments: Vec<&Segment> = path.iter().collect();
    if matches!(error, YamlError::SerdeUnknownField { .. }) {
        segments.pop();
    }
    let mut steps = Vec::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => steps.push(Step::Index(*index)),
            Segment::Map { key } if key != SPANNED_VALUE => steps.push(Step::Key(key.clone())),
            // The format's enums are plain words: a variant is not a step down.
            Segment::Map { .. } | Segment::Enum { .. } => {}
            Segment::Unknown => return None,
        }
    }
    Some(steps)
}

/// `allow[2].cidr`.
fn field(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Index(i) => out += &format!("[{i}]"),
            Step::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out += key;
            }
        }
    }
    out
}

fn error(e: &YamlError, steps: Option<Vec<Step>>, text: &str) -> Error {
    let e = unalias(e);
    let (mut line, mut column) = at(e.location().unwrap_or(Location::UNKNOWN));
    let syntax = !value_error(e);
    let steps = steps.filter(|_| !syntax);
    let mut found = "something else".to_string();
    // serde-saphyr pins a value's type error on its key and a missing field on the last key
    // read: the node the path leads to is where the error is (an unknown field stays at its
    // key). The document is read again for that, on this error path only; serde reads a
    // document only as far as its first error, so a syntax error found now is the one to
    // report, as an editor would.
    if let Some(steps) = &steps
        && !matches!(e, YamlError::SerdeUnknownField { .. })
    {
        match node_at(text, steps) {
            Ok(Some(node)) => (line, column, found) = node,
            Err(again) if !value_error(unalias(&again)) => return error(&again, None, text),
            Ok(None) | Err(_) => {}
        }
    }
    let message = match e {
        YamlError::SerdeUnknownField {
            field, expected, ..
        } if expected.is_empty() => format!("unknown field {}, there are no fields", quoted(field)),
        YamlError::SerdeUnknownField {
            field, expected, ..
        } => format!(
            "unknown field {}, expected {}",
            quoted(field),
            one_of(expected)
        ),
        YamlError::SerdeUnknownVariant {
            variant, expected, ..
        } => format!(
            "unknown value {}, expected {}",
            quoted(variant),
            one_of(expected)
        ),
        YamlError::SerdeMissingField { field, .. } => format!("missing field {}", quoted(field)),
        YamlError::SerdeInvalidType { expected, .. } => {
            format!("expected {expected}, found {found}")
        }
        YamlError::SerdeInvalidValue { expected, .. } => format!("{found} is not {expected}"),
        // serde-saphyr's own checks say what they wanted to start reading.
        YamlError::Unexpected { expected, .. } => {
            let expected = match *expected {
                "mapping start" => "a mapping",
                "sequence start" => "a list",
                "string scalar" => "a string",
                other => other,
            };
            format!("expected {expected}, found {found}")
        }
        YamlError::ExternallyTaggedEnumExpectedScalarOrMapping { .. }
        | YamlError::UnexpectedValueForUnitEnumVariant { .. } => {
            format!("expected a string, found {found}")
        }
        YamlError::DuplicateMappingKey { key, .. } => {
            format!("duplicate key {}", quoted(key.as_deref().unwrap_or("?")))
        }
        YamlError::MultipleDocuments { .. } => "more than one YAML document in the file".into(),
        YamlError::AliasReplayLimitExceeded { .. }
        | YamlError::AliasExpansionLimitExceeded { .. }
        | YamlError::AliasReplayStackDepthExceeded { .. } => {
            "aliases expand to too many nodes".into()
        }
        YamlError::Budget { breach, .. } => format!("over a parser limit: {breach:?}"),
        e => DefaultMessageFormatter.format_message(e).into_owned(),
    };
    Error {
        line,
        column,
        field: steps.as_deref().map(field).unwrap_or_default(),
        message,
        syntax,
    }
}

/// An error met while replaying an alias is the error itself.
fn unalias(e: &YamlError) -> &YamlError {
    match e {
        YamlError::AliasError { error, .. } => error,
        e => e,
    }
}

/// Whether `e` is about a value of a well-formed document (else about the text).
fn value_error(e: &YamlError) -> bool {
    !matches!(
        e,
        YamlError::ExternalMessage { .. }
            | YamlError::DuplicateMappingKey { .. }
            | YamlError::MultipleDocuments { .. }
            | YamlError::AliasReplayLimitExceeded { .. }
            | YamlError::AliasExpansionLimitExceeded { .. }
            | YamlError::AliasReplayStackDepthExceeded { .. }
            | YamlError::UnknownAnchor { .. }
            | YamlError::Budget { .. }
            | YamlError::Eof { .. }
            | YamlError::InvalidUtf8Input
    )
}

/// Any YAML node, kept for its position and what it is: an error's path leads through these.
enum Node {
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<String>, Spanned<Node>)>),
    /// A scalar as a message shows it (`"text"`, `443`, `true`); `None` when empty.
    Scalar(Option<String>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Node, E> {
        Ok(Node::Scalar(Some(b.to_string())))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Node, E> {
        Ok(Node::Scalar(Some(n.to_string())))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Node, E> {
        Ok(Node::Scalar(Some(n.to_string())))
    }

    fn visit_f64<E>(self, x: f64) -> Result<Node, E> {
        Ok(Node::Scalar(Some(format!("{x:?}"))))
    }

    fn visit_str<E>(self, s: &str) -> Result<Node, E> {
        Ok(Node::Scalar(Some(quoted(s))))
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Scalar(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
}

/// Where the node at the end of `steps` is, and what it is (`a list`, `"text"`, ...). An empty
/// value is reported at its key, or at its `-` in a list.
fn node_at(text: &str, steps: &[Step]) -> Result<Option<(usize, usize, String)>, YamlError> {
    let root: Spanned<Node> = serde_saphyr::from_str_with_options(text, options())?;
    let mut node = &root;
    let mut key_at = None;
    for step in steps {
        let next = match (&node.value, step) {
            (Node::Seq(items), Step::Index(i)) => items.get(*i).map(|item| (item, None)),
            (Node::Map(entries), Step::Key(key)) => entries
                .iter()
                .find(|(k, _)| k.value == *key)
                .map(|(k, v)| (v, Some(k.referenced))),
            _ => None,
        };
        let Some(next) = next else { return Ok(None) };
        (node, key_at) = next;
    }
    let found = match &node.value {
        Node::Seq(_) => "a list".to_string(),
        Node::Map(_) => "a mapping".to_string(),
        Node::Scalar(Some(text)) => text.clone(),
        Node::Scalar(None) => {
            let (line, column) = match key_at {
                Some(key) => at(key),
                None => {
                    let (line, column) = at(node.referenced);
                    (line, dash(text, line, column).unwrap_or(column))
                }
            };
            return Ok(Some((line, column, "an empty value".into())));
        }
    };
    let (line, column) = at(node.referenced);
    Ok(Some((line, column, found)))
}

/// The column of the `-` of an empty list item that serde-saphyr places at `column` (just
/// after the `-`, or after a comment that follows it).
fn dash(text: &str, line: usize, column: usize) -> Option<usize> {
    let before: String = text
        .lines()
        .nth(line - 1)?
        .chars()
        .take(column - 1)
        .collect();
    let code = before.split(" #").next()?.trim_end();
    code.ends_with('-').then(|| code.chars().count())
}

/// Quotes `s` for a message, escaping what needs it.
pub fn quoted(s: &str) -> String {
    format!("{s:?}")
}

fn one_of(names: &[&str]) -> String {
    match names {
        [] => "nothing".into(),
        [one] => (*one).into(),
        _ => format!("one of {}", names.join(", ")),
    }
}
