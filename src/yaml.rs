//! The YAML this crate writes (`crd`, `import`), with serde-saphyr, in one stable
//! style: block collections, two-space indentation, sequence items at their key's
//! indentation, multi-line strings as literal blocks, long lines never folded, and
//! strings plain when a reader takes them back as the same string, else
//! single-quoted (`''` for `'`; double-quoted only when they hold control
//! characters). That is the style `crds/` and `import` have always had.
//!
//! serde-saphyr double-quotes the strings it must quote; those that need no
//! escape are swapped for unique plain placeholders before rendering and written
//! single-quoted after. [`Quote::Yaml11`] also quotes the strings that YAML 1.1
//! (kubectl) would read as something else.

use serde::Serialize;

/// Why a value cannot be rendered.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

/// Which strings to quote besides those YAML 1.2 would misread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quote {
    /// Only what the writer must quote.
    Needed,
    /// Also what YAML 1.1 readers take for another type (kubectl uses go-yaml v2,
    /// where `yes`, `on`, `n`, `1_000` and `0b11` are booleans and numbers, which
    /// a Secret's stringData or a tag refuses).
    Yaml11,
}

/// Renders `value` as one YAML document.
pub fn to_string(value: &impl Serialize) -> Result<String, Error> {
    render(vec![Node::of(value)?], Quote::Needed)
}

/// Renders `documents` as YAML documents separated by `---`.
pub fn render(mut documents: Vec<Node>, quote: Quote) -> Result<String, Error> {
    let plain = write(&documents)?;
    let mut quoter = Quoter::new(&plain, quote);
    documents.iter_mut().for_each(|d| quoter.swap(d));
    if quoter.originals.is_empty() {
        return Ok(plain);
    }
    Ok(quoter.restore(write(&documents)?))
}

fn write(documents: &[Node]) -> Result<String, Error> {
    let options = serde_saphyr::ser_options! { folded_wrap_chars: usize::MAX };
    let rendered: Result<Vec<String>, _> = documents
        .iter()
        .map(|d| serde_saphyr::to_string_with_options(d, options.clone()))
        .collect();
    Ok(rendered.map_err(|e| Error(e.to_string()))?.join("---\n"))
}

/// A document as a tree whose maps keep the order the fields were serialized in
/// (serde_json's `Value` sorts keys), so the YAML lists fields as the types do.
#[derive(Debug)]
pub enum Node {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl Node {
    /// `value` as a tree (through JSON: Kubernetes objects are JSON objects).
    pub fn of(value: &impl Serialize) -> Result<Node, Error> {
        let json = serde_json::to_string(value).map_err(|e| Error(e.to_string()))?;
        serde_json::from_str(&json).map_err(|e| Error(e.to_string()))
    }
}

impl Serialize for Node {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        match self {
            Node::Null => serializer.serialize_unit(),
            Node::Bool(b) => serializer.serialize_bool(*b),
            Node::Number(n) => n.serialize(serializer),
            Node::String(s) => serializer.serialize_str(s),
            Node::Seq(items) => serializer.collect_seq(items),
            Node::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Node, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Node, E> {
                Ok(Node::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Node, E> {
                Ok(Node::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Node, E> {
                Ok(Node::Number(n.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Node, E> {
                serde_json::Number::from_f64(n)
                    .map(Node::Number)
                    .ok_or_else(|| E::custom("a finite number"))
            }
            fn visit_str<E>(self, s: &str) -> Result<Node, E> {
                Ok(Node::String(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> Result<Node, E> {
                Ok(Node::String(s))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Node::Map(entries))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Swaps the string values to single-quote for placeholders, and back.
struct Quoter {
    quote: Quote,
    prefix: String,
    originals: Vec<String>,
}

impl Quoter {
    /// Plain scalars that go-yaml v2 resolves to something else than a string.
    const YAML11_WORDS: [&'static str; 37] = [
        "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
        "OFF", "true", "True", "TRUE", "false", "False", "FALSE", "~", "null", "Null", "NULL",
        ".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf", "-.inf", "+.INF", "-.INF", "<<",
    ];

    /// `plain` is the rendering without placeholders: the prefix must not occur in it.
    fn new(plain: &str, quote: Quote) -> Self {
        let prefix = (0..)
            .map(|n| format!("dropbox-operator-quoted-{n}-"))
            .find(|p| !plain.contains(p.as_str()))
            .expect("an unused prefix");
        Self {
            quote,
            prefix,
            originals: Vec::new(),
        }
    }

    fn needs_quotes(&self, s: &str) -> bool {
        // Single quotes cannot escape control characters (and multi-line strings
        // are literal blocks): those stay as the writer has them.
        if s.contains(|c: char| c.is_control()) {
            return false;
        }
        // Anything that may be a number, a timestamp or a float is quoted for
        // YAML 1.1: a quoted string is a string for every YAML reader.
        let yaml11 = self.quote == Quote::Yaml11
            && (Self::YAML11_WORDS.contains(&s)
                || s.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '.')));
        yaml11 || Self::writer_quotes(s)
    }

    /// Whether serde-saphyr would quote `s` as a value.
    fn writer_quotes(s: &str) -> bool {
        serde_saphyr::to_string(&s).map_or(true, |out| out.starts_with(['"', '\'']))
    }

    fn swap(&mut self, value: &mut Node) {
        match value {
            Node::String(s) if self.needs_quotes(s) => {
                let placeholder = format!("{}{}x", self.prefix, self.originals.len());
                self.originals.push(std::mem::replace(s, placeholder));
            }
            Node::Seq(items) => items.iter_mut().for_each(|v| self.swap(v)),
            Node::Map(entries) => entries.iter_mut().for_each(|(_, v)| self.swap(v)),
            _ => {}
        }
    }

    fn restore(&self, mut yaml: String) -> String {
        for (i, original) in self.originals.iter().enumerate() {
            let quoted = format!("'{}'", original.replace('\'', "''"));
            yaml = yaml.replace(&format!("{}{i}x", self.prefix), &quoted);
        }
        yaml
    }
}
