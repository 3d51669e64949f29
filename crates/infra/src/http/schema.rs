//! OpenAPI schemas that carry the real constraints of `api.md` (lengths,
//! patterns, enums), for the fields and parameters whose Rust type alone
//! cannot say them. The server checks these rules itself (in `events::fields`
//! and the query parsers); the spec only tells clients, and the fuzzer.

use std::borrow::Cow;

use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

/// No NUL anywhere (PostgreSQL text and jsonb cannot hold it).
pub const NO_NUL: &str = "^[^\\u0000]*$";
/// A name: at least one character that is not whitespace, no NUL. U+0085
/// is whitespace to the server's trim (Unicode White_Space) but not to the
/// ECMAScript `\s` a client validates with, so it is named explicitly.
pub const NAME: &str = "^[^\\u0000]*[^\\s\\u0000\\u0085][^\\u0000]*$";
/// An agent type.
pub const AGENT_TYPE: &str = "^[a-z0-9_-]{1,64}$";
/// A username.
pub const USERNAME: &str = "^[A-Za-z0-9_.@-]{1,64}$";
/// `If-Match`: one ETag (`"<version>"`, optionally weak) or `*`.
pub const IF_MATCH: &str = "^(\\*|(W/)?\"[0-9]{1,19}\")$";
/// A tag filter: `key:value`.
pub const TAG_FILTER: &str = "^[^:\\u0000]{1,64}:[^\\u0000]{0,256}$";

fn string(min: Option<usize>, max: Option<usize>, pattern: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(min)
        .max_length(max)
        .pattern(Some(pattern))
}

macro_rules! named_schema {
    ($(#[$doc:meta])* $name:ident, $schema:expr) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                $schema.into()
            }
        }

        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

named_schema!(
    /// A capability: 1..=100 characters, no NUL.
    Capability,
    string(Some(1), Some(100), NO_NUL).description(Some("1..=100 characters"))
);

named_schema!(
    /// A tag filter, `key:value` (repeat the parameter for several).
    TagFilter,
    string(None, None, TAG_FILTER).description(Some("key:value"))
);

/// An agent's `status`.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum AgentStatusName {
    Active,
    Inactive,
    Paused,
    Error,
}

/// `GET /agents/export`'s `format`.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum ExportFormat {
    Csv,
    Ndjson,
    Json,
}

/// `GET /analytics`'s `bucket`.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum BucketName {
    Minute,
    Hour,
    Day,
}

/// `name` of an agent or project: 1..=200 characters after trimming.
pub fn name() -> Schema {
    string(Some(1), Some(200), NAME)
        .description(Some(
            "1..=200 characters after trimming; not only whitespace",
        ))
        .into()
}

/// `description`: at most 4,000 characters.
pub fn description() -> Schema {
    string(None, Some(4000), NO_NUL)
        .description(Some("At most 4,000 characters; default \"\""))
        .into()
}

/// An agent's `type`.
pub fn agent_type() -> Schema {
    string(Some(1), Some(64), AGENT_TYPE)
        .description(Some("1..=64 characters of [a-z0-9_-]"))
        .into()
}

/// `capabilities`: at most 64 strings of 1..=100 characters.
pub fn capabilities() -> Schema {
    ArrayBuilder::new()
        .items(Capability::schema())
        .max_items(Some(64))
        .description(Some("At most 64 strings of 1..=100 characters"))
        .into()
}

/// `tags`: at most 32 entries; keys 1..=64 characters without ':', values at
/// most 256 characters.
pub fn tags() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .max_properties(Some(32))
        .property_names(Some(string(Some(1), Some(64), "^[^:\\u0000]*$")))
        .additional_properties(Some(string(None, Some(256), NO_NUL)))
        .description(Some(
            "At most 32 entries; keys 1..=64 characters without ':', values at most 256 characters",
        ))
        .into()
}

/// `config`: a JSON object of at most 64 KiB, without NUL in any string.
pub fn config() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(string(None, None, NO_NUL)))
        .additional_properties(Some(Ref::from_schema_name("ConfigValue")))
        .description(Some(
            "A JSON object of at most 64 KiB (as compact JSON); no NUL in any key or string",
        ))
        .into()
}

/// Any JSON value without NUL in a key or string: the values of `config`.
/// Registered as the component `ConfigValue` (it refers to itself).
pub fn config_value() -> Schema {
    let nested = || Ref::from_schema_name("ConfigValue");
    OneOfBuilder::new()
        .item(string(None, None, NO_NUL))
        .item(ObjectBuilder::new().schema_type(Type::Number))
        .item(ObjectBuilder::new().schema_type(Type::Boolean))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .item(ArrayBuilder::new().items(nested()))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property_names(Some(string(None, None, NO_NUL)))
                .additional_properties(Some(nested())),
        )
        .description(Some("Any JSON value without NUL in a key or string"))
        .into()
}
