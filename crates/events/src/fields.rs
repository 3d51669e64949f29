//! Validated field types: input is parsed into these once, at the boundary,
//! and only these travel inward. A value of one of these types is valid by
//! construction, so the domain never re-checks it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One reason a field of a request is invalid; `api.md`'s `errors` entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Applies one field of an update: replaces the value when the update
/// carries one, leaves it when the field was not changed.
pub(crate) fn apply_change<T: Clone>(field: &mut T, change: &Option<T>) {
    if let Some(new) = change {
        *field = new.clone();
    }
}

/// Counts characters as a user sees them in the limits of `api.md`: Unicode
/// scalar values, not bytes.
fn chars(s: &str) -> usize {
    s.chars().count()
}

/// NUL cannot be stored in PostgreSQL text or jsonb; an event carrying one
/// could never be projected, so it is refused at the door.
fn no_nul(field: impl Into<String>, s: &str) -> Result<(), FieldError> {
    if s.contains('\0') {
        Err(FieldError::new(field, "must not contain NUL characters"))
    } else {
        Ok(())
    }
}

fn json_has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(json_has_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v)),
        _ => false,
    }
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub fn into_inner(self) -> String {
                self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_newtype!(
    /// An agent's or project's name: 1..=200 characters after trimming.
    Name
);
string_newtype!(
    /// An agent's type: 1..=64 characters of `[a-z0-9_-]`.
    AgentType
);
string_newtype!(
    /// Free text of at most 4,000 characters.
    Description
);

impl Name {
    pub const MAX_CHARS: usize = 200;

    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldError> {
        no_nul(field, raw)?;
        let trimmed = raw.trim();
        match chars(trimmed) {
            0 => Err(FieldError::new(field, "must not be empty")),
            n if n > Self::MAX_CHARS => Err(FieldError::new(
                field,
                format!("must be at most {} characters", Self::MAX_CHARS),
            )),
            _ => Ok(Name(trimmed.to_owned())),
        }
    }
}

impl AgentType {
    pub const MAX_CHARS: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let n = raw.len();
        if n == 0 || n > Self::MAX_CHARS {
            return Err(FieldError::new("type", "must be 1 to 64 characters"));
        }
        if !raw
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
        {
            return Err(FieldError::new(
                "type",
                "may only contain a-z, 0-9, '_' and '-'",
            ));
        }
        Ok(AgentType(raw.to_owned()))
    }
}

impl Description {
    pub const MAX_CHARS: usize = 4_000;

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        no_nul("description", raw)?;
        if chars(raw) > Self::MAX_CHARS {
            return Err(FieldError::new(
                "description",
                "must be at most 4000 characters",
            ));
        }
        Ok(Description(raw.to_owned()))
    }

    pub fn empty() -> Self {
        Description(String::new())
    }
}

/// An agent's lifecycle status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    #[default]
    Active,
    Inactive,
    Paused,
    Error,
}

impl AgentStatus {
    pub const ALL: [AgentStatus; 4] = [
        AgentStatus::Active,
        AgentStatus::Inactive,
        AgentStatus::Paused,
        AgentStatus::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Active => "active",
            AgentStatus::Inactive => "inactive",
            AgentStatus::Paused => "paused",
            AgentStatus::Error => "error",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == raw)
            .ok_or_else(|| {
                FieldError::new("status", "must be one of active, inactive, paused, error")
            })
    }
}

/// At most 64 capability strings of 1..=100 characters each. Order is kept as
/// given: it is the writer's, not ours.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Capabilities(Vec<String>);

impl Capabilities {
    pub const MAX_ITEMS: usize = 64;
    pub const MAX_CHARS: usize = 100;

    pub fn parse(raw: Vec<String>) -> Result<Self, FieldError> {
        if raw.len() > Self::MAX_ITEMS {
            return Err(FieldError::new(
                "capabilities",
                "must have at most 64 items",
            ));
        }
        for (i, c) in raw.iter().enumerate() {
            no_nul(format!("capabilities[{i}]"), c)?;
            let n = chars(c);
            if n == 0 || n > Self::MAX_CHARS {
                return Err(FieldError::new(
                    format!("capabilities[{i}]"),
                    "must be 1 to 100 characters",
                ));
            }
        }
        Ok(Capabilities(raw))
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

/// A JSON object of at most 64 KiB (measured as compact JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Config(serde_json::Map<String, serde_json::Value>);

impl Default for Config {
    fn default() -> Self {
        Config(serde_json::Map::new())
    }
}

impl Config {
    pub const MAX_BYTES: usize = 64 * 1024;

    pub fn parse(raw: serde_json::Value) -> Result<Self, FieldError> {
        if json_has_nul(&raw) {
            return Err(FieldError::new("config", "must not contain NUL characters"));
        }
        let serde_json::Value::Object(map) = raw else {
            return Err(FieldError::new("config", "must be a JSON object"));
        };
        let size = serde_json::to_vec(&map)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > Self::MAX_BYTES {
            return Err(FieldError::new("config", "must be at most 64 KiB as JSON"));
        }
        Ok(Config(map))
    }

    pub fn as_map(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.0
    }
}

/// String-to-string labels, at most 32. Keys are 1..=64 characters without
/// `:` (the list filter is `tag=key:value`); values at most 256 characters.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tags(BTreeMap<String, String>);

impl Tags {
    pub const MAX_ITEMS: usize = 32;
    pub const MAX_KEY_CHARS: usize = 64;
    pub const MAX_VALUE_CHARS: usize = 256;

    pub fn parse(raw: BTreeMap<String, String>) -> Result<Self, FieldError> {
        if raw.len() > Self::MAX_ITEMS {
            return Err(FieldError::new("tags", "must have at most 32 entries"));
        }
        for (k, v) in &raw {
            no_nul(format!("tags.{k}"), k)?;
            no_nul(format!("tags.{k}"), v)?;
            let n = chars(k);
            if n == 0 || n > Self::MAX_KEY_CHARS || k.contains(':') {
                return Err(FieldError::new(
                    format!("tags.{k}"),
                    "keys must be 1 to 64 characters without ':'",
                ));
            }
            if chars(v) > Self::MAX_VALUE_CHARS {
                return Err(FieldError::new(
                    format!("tags.{k}"),
                    "values must be at most 256 characters",
                ));
            }
        }
        Ok(Tags(raw))
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_is_trimmed_and_bounded() {
        assert_eq!(Name::parse("name", "  x ").unwrap().as_str(), "x");
        assert!(Name::parse("name", "   ").is_err());
        assert!(Name::parse("name", &"é".repeat(200)).is_ok());
        assert!(Name::parse("name", &"é".repeat(201)).is_err());
    }

    #[test]
    fn agent_type_alphabet() {
        assert!(AgentType::parse("llm_worker-2").is_ok());
        assert!(AgentType::parse("LLM").is_err());
        assert!(AgentType::parse("a b").is_err());
        assert!(AgentType::parse("").is_err());
        assert!(AgentType::parse(&"a".repeat(65)).is_err());
    }

    #[test]
    fn capabilities_bounds_name_the_item() {
        let err = Capabilities::parse(vec!["ok".into(), String::new()]).unwrap_err();
        assert_eq!(err.field, "capabilities[1]");
        assert!(Capabilities::parse(vec!["x".into(); 65]).is_err());
    }

    #[test]
    fn config_must_be_a_small_object() {
        assert!(Config::parse(serde_json::json!([1])).is_err());
        let big = "x".repeat(64 * 1024);
        assert!(Config::parse(serde_json::json!({ "k": big })).is_err());
        assert!(Config::parse(serde_json::json!({ "k": 1 })).is_ok());
    }

    #[test]
    fn nul_is_refused_everywhere() {
        assert!(Name::parse("name", "a\0b").is_err());
        assert!(Description::parse("a\0").is_err());
        assert!(Capabilities::parse(vec!["a\0".into()]).is_err());
        assert!(Tags::parse([("k".to_owned(), "v\0".to_owned())].into()).is_err());
        assert!(Config::parse(serde_json::json!({"a": [{"b\0": 1}]})).is_err());
        assert!(Config::parse(serde_json::json!({"a": ["x\0"]})).is_err());
    }

    #[test]
    fn tags_bounds() {
        let many: BTreeMap<_, _> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(Tags::parse(many).is_err());
        assert!(Tags::parse([("a:b".to_owned(), "v".to_owned())].into()).is_err());
        assert!(Tags::parse([("env".to_owned(), "prod".to_owned())].into()).is_ok());
    }
}
