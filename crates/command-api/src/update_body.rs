//! Update bodies accept a resource's read-only fields and ignore them, so a
//! client may send back what it read.

/// Declares the body of an update: the struct as written, plus one field
/// for each read-only field named after `read_only:`, accepted, ignored and
/// left out of the schema.
///
/// A macro, not a shared struct: `#[serde(flatten)]` cannot be combined
/// with `deny_unknown_fields`, which must still refuse every other unknown
/// field, naming all the accepted ones (these included) in its message.
macro_rules! update_body {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($(#[$field_meta:meta])* pub $field:ident: $ty:ty,)*
        }
        read_only: $($ignored:ident),+ $(,)?
    ) => {
        $(#[$meta])*
        pub struct $name {
            $($(#[$field_meta])* pub $field: $ty,)*
            $(
                #[serde(default)]
                #[schema(ignore)]
                pub $ignored: Option<::serde::de::IgnoredAny>,
            )+
        }
    };
}

pub(crate) use update_body;
