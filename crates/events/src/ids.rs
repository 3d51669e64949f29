//! Typed aggregate ids.
//!
//! An agent's id and a project's id are both UUIDs, but one must never be
//! passed where the other is meant: a function that takes a `ProjectId`
//! cannot be handed an agent's. Both serialize as the bare UUID, so JSON,
//! subjects and stored events look exactly as they would with a `Uuid`.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Declares an id newtype over `Uuid`: `Copy`, ordered, hashable, shown and
/// (de)serialized as the UUID itself, and convertible to and from it.
macro_rules! aggregate_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            pub const fn as_uuid(self) -> Uuid {
                self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                $name(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

aggregate_id!(
    /// The id of an agent: the aggregate id of its events.
    AgentId
);
aggregate_id!(
    /// The id of a project: the aggregate id of its events.
    ProjectId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_its_uuid_on_the_wire_and_on_screen() {
        let uuid = Uuid::now_v7();
        let id = AgentId::from(uuid);
        assert_eq!(
            serde_json::to_value(id).unwrap(),
            serde_json::to_value(uuid).unwrap()
        );
        assert_eq!(
            serde_json::from_value::<ProjectId>(serde_json::to_value(uuid).unwrap()).unwrap(),
            ProjectId::from(uuid)
        );
        assert_eq!(id.to_string(), uuid.to_string());
        assert_eq!(Uuid::from(id), uuid);
    }
}
