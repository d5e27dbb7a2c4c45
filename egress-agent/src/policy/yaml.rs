//! A YAML document as a tree of nodes that know their line and column, and a serde
//! `Deserializer` over it that pins every error on the innermost node being read.
//!
//! The parser is `yaml-rust2`'s event API (its markers have exact positions for scalars).
//! Errors carry the node's position and its field path (`allow[2].ports[1]`), attached once,
//! by the innermost call that sees them: a `Visitor` or a `TryFrom` that rejects a value is
//! reported at that value, an unknown field at its key, a missing one at its mapping.

use std::{
    collections::{HashMap, HashSet},
    fmt,
};

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, Expected, IntoDeserializer, MapAccess,
    SeqAccess, Unexpected, VariantAccess, Visitor,
};
use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::{Marker, TScalarStyle},
};

/// A position in the text: line and column (in characters), both from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub col: usize,
}

impl Mark {
    fn from_marker(m: Marker) -> Self {
        Self {
            line: m.line().max(1),
            col: m.col() + 1,
        }
    }
}

/// A YAML node and where it starts.
#[derive(Debug, Clone)]
pub struct Node {
    /// What it is.
    pub kind: Kind,
    /// Where it starts: the first character of a scalar, the `[`, `{` or `-` of a collection
    /// (or its first key for a block mapping).
    pub mark: Mark,
}

/// The three kinds of YAML node.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A scalar's text; `plain` when unquoted (so `443` is a number and `"443"` a string).
    Scalar {
        /// The text, escapes resolved.
        value: String,
        /// Unquoted, untagged: its type follows the YAML 1.2 core schema.
        plain: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, keys in document order.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The value of `key` if this is a mapping that has it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            Kind::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Item `index` if this is a sequence that has it.
    pub fn at(&self, index: usize) -> Option<&Node> {
        match &self.kind {
            Kind::Seq(items) => items.get(index),
            _ => None,
        }
    }

    /// The text of a scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { value, plain: true } if resolve(value) == Plain::Null)
    }

    fn size(&self) -> usize {
        match &self.kind {
            Kind::Scalar { .. } => 1,
            Kind::Seq(items) => 1 + items.iter().map(Node::size).sum::<usize>(),
            Kind::Map(entries) => {
                1 + entries
                    .iter()
                    .map(|(k, v)| k.size() + v.size())
                    .sum::<usize>()
            }
        }
    }
}

/// A syntax error: where and what.
#[derive(Debug)]
pub struct SyntaxError {
    /// Where the parser stopped.
    pub mark: Mark,
    /// Its message.
    pub message: String,
}

/// How many nodes aliases may copy in, in all: a bound against "billion laughs" documents.
const ALIAS_BUDGET: usize = 1_000_000;

/// Parses one YAML document; an empty text is an empty mapping at 1:1.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder {
        lines: text.lines().collect(),
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        documents: 0,
        alias_budget: ALIAS_BUDGET,
        error: None,
    };
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        return Err(SyntaxError {
            mark: Mark::from_marker(*e.marker()),
            message: e.info().to_string(),
        });
    }
    if let Some(e) = builder.error {
        return Err(e);
    }
    Ok(builder.root.unwrap_or(Node {
        kind: Kind::Map(Vec::new()),
        mark: Mark { line: 1, col: 1 },
    }))
}

enum Frame {
    Seq {
        items: Vec<Node>,
        mark: Mark,
        anchor: usize,
    },
    Map {
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
        seen: HashSet<String>,
        mark: Mark,
        anchor: usize,
    },
}

struct Builder<'t> {
    lines: Vec<&'t str>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, (Node, usize)>,
    root: Option<Node>,
    documents: usize,
    alias_budget: usize,
    error: Option<SyntaxError>,
}

impl Builder<'_> {
    fn char_at(&self, mark: Mark) -> Option<char> {
        self.lines.get(mark.line - 1)?.chars().nth(mark.col - 1)
    }

    /// The `-` just before `mark` on its line, with only blanks between.
    fn dash_before(&self, mark: Mark) -> Option<Mark> {
        let line = self.lines.get(mark.line - 1)?;
        let before: String = line.chars().take(mark.col - 1).collect();
        let trimmed = before.trim_end();
        trimmed.ends_with('-').then(|| Mark {
            line: mark.line,
            col: trimmed.chars().count(),
        })
    }

    fn fail(&mut self, mark: Mark, message: String) {
        if self.error.is_none() {
            self.error = Some(SyntaxError { mark, message });
        }
    }

    /// Adds a finished node to its parent (or makes it the root).
    fn push(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            let size = node.size();
            self.anchors.insert(anchor, (node.clone(), size));
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => {
                let mut node = node;
                if is_empty(&node) {
                    // An empty item's marker is the next token's, often lines below.
                    node.mark = dash_above(&self.lines, node.mark).unwrap_or(node.mark);
                }
                items.push(node);
            }
            Some(Frame::Map {
                entries, key, seen, ..
            }) => match key.take() {
                None => {
                    if let Some(k) = node.as_str()
                        && !seen.insert(k.to_string())
                    {
                        let (mark, message) = (node.mark, format!("duplicate key \"{k}\""));
                        self.fail(mark, message);
                        return;
                    }
                    *key = Some(node);
                }
                Some(k) => {
                    let mut node = node;
                    if is_empty(&node) {
                        // As for items: point at the key whose value is missing.
                        node.mark = k.mark;
                    }
                    entries.push((k, node));
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, ev: Event, marker: Marker) {
        if self.error.is_some() {
            return;
        }
        let mark = Mark::from_marker(marker);
        match ev {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    self.fail(mark, "more than one YAML document in the file".into());
                }
            }
            Event::Scalar(value, style, anchor, tag) => {
                let tagged = tag.is_some();
                let plain = style == TScalarStyle::Plain && !tagged;
                self.push(
                    Node {
                        kind: Kind::Scalar { value, plain },
                        mark,
                    },
                    anchor,
                );
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq {
                items: Vec::new(),
                mark,
                anchor,
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Frame::Map {
                entries: Vec::new(),
                key: None,
                seen: HashSet::new(),
                mark,
                anchor,
            }),
            Event::SequenceEnd => {
                if let Some(Frame::Seq {
                    items,
                    mark,
                    anchor,
                }) = self.stack.pop()
                {
                    // The event's marker is exact for `[` and for most block sequences, but
                    // one at column 0 gets the first item's position: find its `-` then.
                    let mark = match (self.char_at(mark), items.first()) {
                        (Some('[' | '-'), _) | (_, None) => mark,
                        (_, Some(first)) => self.dash_before(first.mark).unwrap_or(first.mark),
                    };
                    self.push(
                        Node {
                            kind: Kind::Seq(items),
                            mark,
                        },
                        anchor,
                    );
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map {
                    entries,
                    mark,
                    anchor,
                    ..
                }) = self.stack.pop()
                {
                    // A block mapping's start marker points after its first key (the parser
                    // only knows it is a mapping at the `:`): use the first key instead.
                    let mark = match (self.char_at(mark), entries.first()) {
                        (Some('{'), _) | (_, None) => mark,
                        (_, Some((first, _))) => first.mark,
                    };
                    self.push(
                        Node {
                            kind: Kind::Map(entries),
                            mark,
                        },
                        anchor,
                    );
                }
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some((node, size)) if *size <= self.alias_budget => {
                    self.alias_budget -= size;
                    let node = node.clone();
                    self.push(node, 0);
                }
                Some(_) => self.fail(mark, "aliases expand to too many nodes".into()),
                None => self.fail(mark, "alias to an unknown anchor".into()),
            },
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

/// An empty plain scalar: a value left out (`ports:`, `-`).
fn is_empty(node: &Node) -> bool {
    matches!(&node.kind, Kind::Scalar { value, plain: true } if value.is_empty())
}

/// The `-` of an empty sequence item whose marker is `mark`. That marker is the next
/// token's, on a later line than the `-` (`-` then `- x`: the `x`), so this is the last
/// non-blank character of the lines above, skipping blank and comment-only lines.
fn dash_above(lines: &[&str], mark: Mark) -> Option<Mark> {
    let mut line = mark.line;
    loop {
        line -= 1;
        if line == 0 {
            return None;
        }
        let text = lines.get(line - 1)?;
        let code = match text.find(" #") {
            Some(i) => &text[..i],
            None if text.trim_start().starts_with('#') => "",
            None => text,
        };
        let code = code.trim_end();
        if !code.is_empty() {
            return code.ends_with('-').then(|| Mark {
                line,
                col: code.chars().count(),
            });
        }
    }
}

/// A plain scalar's type in the YAML 1.2 core schema (decimal integers only).
#[derive(Debug, PartialEq)]
enum Plain {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Str,
}

fn resolve(s: &str) -> Plain {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Plain::Null,
        "true" | "True" | "TRUE" => return Plain::Bool(true),
        "false" | "False" | "FALSE" => return Plain::Bool(false),
        _ => {}
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = s.strip_prefix('+').unwrap_or(s).parse::<u64>() {
            return Plain::Unsigned(n);
        }
        if let Ok(n) = s.parse::<i64>() {
            return Plain::Signed(n);
        }
    }
    let looks_numeric = digits
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && digits.bytes().any(|b| b.is_ascii_digit());
    if looks_numeric && let Ok(f) = s.parse::<f64>() {
        return Plain::Float(f);
    }
    Plain::Str
}

/// A field path: `.` for the document, then `allow[2].ports[1]`-style segments.
#[derive(Debug, Clone, Copy)]
pub enum Path<'p> {
    /// The document itself.
    Root,
    /// Item `usize` of a sequence.
    Index(&'p Path<'p>, usize),
    /// The value of a mapping key.
    Key(&'p Path<'p>, &'p str),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
            Path::Key(Path::Root, key) => f.write_str(key),
            Path::Key(parent, key) => write!(f, "{parent}.{key}"),
        }
    }
}

/// A deserialization error and, once known, where it is.
#[derive(Debug)]
pub struct DeError {
    /// What is wrong.
    pub message: String,
    /// Position and field path of the innermost node that was being read.
    pub at: Option<(Mark, String)>,
}

impl DeError {
    fn at(mut self, node: &Node, path: &Path<'_>) -> Self {
        if self.at.is_none() {
            self.at = Some((node.mark, path.to_string()));
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

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

/// How a found value reads in a message.
struct Found<'a>(Unexpected<'a>);

impl fmt::Display for Found<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Unexpected::Str(s) => f.write_str(&quoted(s)),
            Unexpected::Char(c) => f.write_str(&quoted(&c.to_string())),
            Unexpected::Bool(b) => write!(f, "{b}"),
            Unexpected::Unsigned(n) => write!(f, "{n}"),
            Unexpected::Signed(n) => write!(f, "{n}"),
            Unexpected::Float(x) => write!(f, "{x:?}"),
            Unexpected::Unit | Unexpected::Option => f.write_str("an empty value"),
            Unexpected::Seq => f.write_str("a list"),
            Unexpected::Map => f.write_str("a mapping"),
            Unexpected::Other(s) => f.write_str(s),
            _ => f.write_str("something else"),
        }
    }
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self {
            message: msg.to_string(),
            at: None,
        }
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::custom(format_args!("expected {exp}, found {}", Found(unexp)))
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::custom(format_args!("{} is not {exp}", Found(unexp)))
    }

    fn invalid_length(len: usize, exp: &dyn Expected) -> Self {
        Self::custom(format_args!("expected {exp}, found {len} items"))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Self::custom(format_args!(
            "unknown value {}, expected {}",
            quoted(variant),
            one_of(expected)
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        if expected.is_empty() {
            Self::custom(format_args!(
                "unknown field {}, there are no fields",
                quoted(field)
            ))
        } else {
            Self::custom(format_args!(
                "unknown field {}, expected {}",
                quoted(field),
                one_of(expected)
            ))
        }
    }

    fn missing_field(field: &'static str) -> Self {
        Self::custom(format_args!("missing field {}", quoted(field)))
    }

    fn duplicate_field(field: &'static str) -> Self {
        Self::custom(format_args!("duplicate field {}", quoted(field)))
    }
}

/// Deserializes a `T` from `root`; the error, if any, knows its position and field path.
pub fn from_node<'de, T: de::Deserialize<'de>>(root: &'de Node) -> Result<T, DeError> {
    let path = Path::Root;
    T::deserialize(NodeDe { node: root, path }).map_err(|e| e.at(root, &path))
}

/// Deserializer of one node at one path.
#[derive(Clone, Copy)]
struct NodeDe<'de, 'p> {
    node: &'de Node,
    path: Path<'p>,
}

impl<'de> NodeDe<'de, '_> {
    fn unexpected(&self) -> Unexpected<'de> {
        match &self.node.kind {
            Kind::Scalar { value, plain } => {
                if !plain {
                    return Unexpected::Str(value);
                }
                match resolve(value) {
                    Plain::Null => Unexpected::Unit,
                    Plain::Bool(b) => Unexpected::Bool(b),
                    Plain::Unsigned(n) => Unexpected::Unsigned(n),
                    Plain::Signed(n) => Unexpected::Signed(n),
                    Plain::Float(x) => Unexpected::Float(x),
                    Plain::Str => Unexpected::Str(value),
                }
            }
            Kind::Seq(_) => Unexpected::Seq,
            Kind::Map(_) => Unexpected::Map,
        }
    }

    fn expected(&self, what: &str) -> DeError {
        de::Error::custom(format_args!(
            "expected {what}, found {}",
            Found(self.unexpected())
        ))
    }

    fn fix<T>(&self, r: Result<T, DeError>) -> Result<T, DeError> {
        r.map_err(|e| e.at(self.node, &self.path))
    }

    fn visit_seq<V: Visitor<'de>>(&self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.kind {
            Kind::Seq(items) => visitor.visit_seq(SeqDe {
                items: items.iter(),
                index: 0,
                path: &self.path,
            }),
            _ => Err(self.expected("a list")),
        }
    }

    fn visit_map<V: Visitor<'de>>(&self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.kind {
            Kind::Map(entries) => visitor.visit_map(MapDe {
                entries: entries.iter(),
                value: None,
                path: &self.path,
            }),
            _ => Err(self.expected("a mapping")),
        }
    }
}

impl<'de> Deserializer<'de> for NodeDe<'de, '_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.node.kind {
            Kind::Scalar { value, plain: true } => match resolve(value) {
                Plain::Null => visitor.visit_unit(),
                Plain::Bool(b) => visitor.visit_bool(b),
                Plain::Unsigned(n) => visitor.visit_u64(n),
                Plain::Signed(n) => visitor.visit_i64(n),
                Plain::Float(x) => visitor.visit_f64(x),
                Plain::Str => visitor.visit_borrowed_str(value),
            },
            Kind::Scalar {
                value,
                plain: false,
            } => visitor.visit_borrowed_str(value),
            Kind::Seq(_) => self.visit_seq(visitor),
            Kind::Map(_) => self.visit_map(visitor),
        };
        self.fix(r)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.node.kind {
            Kind::Scalar { value, .. } => visitor.visit_borrowed_str(value),
            _ => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        };
        self.fix(r)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.kind {
            Kind::Scalar { .. } => self.deserialize_str(visitor),
            _ => self.fix(Err(self.expected("a field name"))),
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = if self.node.is_null() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        };
        self.fix(r)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = if self.node.is_null() {
            visitor.visit_unit()
        } else {
            Err(self.expected("an empty value"))
        };
        self.fix(r)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let r = visitor.visit_newtype_struct(self);
        self.fix(r)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = self.visit_seq(visitor);
        self.fix(r)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = self.visit_map(visitor);
        self.fix(r)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let r = match &self.node.kind {
            Kind::Scalar { value, .. } if !self.node.is_null() => {
                visitor.visit_enum(UnitVariant(value))
            }
            _ => Err(self.expected("a string")),
        };
        self.fix(r)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64
    }
}

struct SeqDe<'de, 'p> {
    items: std::slice::Iter<'de, Node>,
    index: usize,
    path: &'p Path<'p>,
}

impl<'de> SeqAccess<'de> for SeqDe<'de, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.next() else {
            return Ok(None);
        };
        let path = Path::Index(self.path, self.index);
        self.index += 1;
        seed.deserialize(NodeDe { node, path })
            .map(Some)
            .map_err(|e| e.at(node, &path))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapDe<'de, 'p> {
    entries: std::slice::Iter<'de, (Node, Node)>,
    value: Option<(&'de Node, &'de Node)>,
    path: &'p Path<'p>,
}

impl<'de> MapAccess<'de> for MapDe<'de, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some((key, value));
        // A key is reported with its mapping's path (`allow[0]: unknown field "prot"`).
        let path = *self.path;
        seed.deserialize(NodeDe { node: key, path })
            .map(Some)
            .map_err(|e| e.at(key, &path))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let (key, node) = self
            .value
            .take()
            .expect("serde asks for a value after its key");
        let path = Path::Key(self.path, key.as_str().unwrap_or("?"));
        seed.deserialize(NodeDe { node, path })
            .map_err(|e| e.at(node, &path))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// A scalar read as an enum: only unit variants exist in the format.
struct UnitVariant<'de>(&'de str);

impl<'de> EnumAccess<'de> for UnitVariant<'de> {
    type Error = DeError;
    type Variant = Self;

    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self), DeError> {
        let v = seed.deserialize(self.0.into_deserializer())?;
        Ok((v, self))
    }
}

impl<'de> VariantAccess<'de> for UnitVariant<'de> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, DeError> {
        Err(de::Error::custom("expected a mapping"))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _v: V) -> Result<V::Value, DeError> {
        Err(de::Error::custom("expected a list"))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _v: V,
    ) -> Result<V::Value, DeError> {
        Err(de::Error::custom("expected a mapping"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_point_at_values_and_collections() {
        let text = "a: 1\nb:\n  - x: y\n    z: [1, \"2\"]\n  - {q: r}\nc:\n- 1\n";
        let root = parse(text).unwrap();
        assert_eq!(root.mark, Mark { line: 1, col: 1 });
        let b = root.get("b").unwrap();
        assert_eq!(b.mark, Mark { line: 3, col: 3 });
        let item = b.at(0).unwrap();
        assert_eq!(item.mark, Mark { line: 3, col: 5 });
        let z = item.get("z").unwrap();
        assert_eq!(z.mark, Mark { line: 4, col: 8 });
        assert_eq!(z.at(1).unwrap().mark, Mark { line: 4, col: 12 });
        assert_eq!(b.at(1).unwrap().mark, Mark { line: 5, col: 5 });
        assert_eq!(root.get("c").unwrap().mark, Mark { line: 7, col: 1 });
    }

    #[test]
    fn empty_values_point_at_their_key_or_dash() {
        let root = parse("a:\nb:\n  -\n  # note\n\n  - x\n  - # empty\nc: 1\n").unwrap();
        assert_eq!(root.get("a").unwrap().mark, Mark { line: 1, col: 1 });
        let b = root.get("b").unwrap();
        assert_eq!(b.at(0).unwrap().mark, Mark { line: 3, col: 3 });
        assert_eq!(b.at(2).unwrap().mark, Mark { line: 7, col: 3 });
    }

    #[test]
    fn block_sequences_at_column_one() {
        let root = parse("a:\n- 1\n- - x\n  - y\n").unwrap();
        let a = root.get("a").unwrap();
        assert_eq!(a.mark, Mark { line: 2, col: 1 });
        assert_eq!(a.at(1).unwrap().mark, Mark { line: 3, col: 3 });
    }

    #[test]
    fn plain_scalars_follow_the_core_schema() {
        assert_eq!(resolve("443"), Plain::Unsigned(443));
        assert_eq!(resolve("-1"), Plain::Signed(-1));
        assert_eq!(resolve("1.5"), Plain::Float(1.5));
        assert_eq!(resolve("~"), Plain::Null);
        assert_eq!(resolve("true"), Plain::Bool(true));
        assert_eq!(resolve("8000-8080"), Plain::Str);
        assert_eq!(resolve("10.0.0.1"), Plain::Str);
        assert_eq!(resolve("inf"), Plain::Str);
    }

    #[test]
    fn duplicate_keys_and_documents_are_errors() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(
            (e.mark, e.message.as_str()),
            (Mark { line: 3, col: 1 }, "duplicate key \"a\"")
        );
        let e = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(e.mark.line, 2);
    }

    #[test]
    fn aliases_are_copied_within_a_budget() {
        let root = parse("a: &x [1, 2]\nb: *x\n").unwrap();
        assert_eq!(root.get("b").unwrap().at(1).unwrap().as_str(), Some("2"));
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            text += &format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            );
        }
        let e = parse(&text).unwrap_err();
        assert_eq!(e.message, "aliases expand to too many nodes");
    }
}
