//! The project aggregate. Agents refer to projects by id; whether a project
//! exists is decided from its own events, never from a read model.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::{Recorded, lifecycle_codec};
use crate::fields::{Description, Name, apply_change};

pub const CREATED: &str = "project.created";
pub const UPDATED: &str = "project.updated";
pub const DELETED: &str = "project.deleted";

pub const EVENT_TYPES: [&str; 3] = [CREATED, UPDATED, DELETED];

/// Body of `project.created` v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectCreated {
    pub name: Name,
    pub description: Description,
}

/// Body of `project.updated` v1: the changed fields only.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<Description>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProjectEvent {
    Created(ProjectCreated),
    Updated(ProjectChanges),
    Deleted,
}

lifecycle_codec!(ProjectEvent: CREATED, UPDATED, DELETED);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Project {
    pub id: Uuid,
    pub name: Name,
    pub description: Description,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub created_by: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum ProjectState {
    #[default]
    Absent,
    Live(Project),
    Deleted(Project),
}

impl ProjectState {
    /// Whether agents may be placed in this project.
    pub fn exists(&self) -> bool {
        matches!(self, ProjectState::Live(_))
    }
}

impl ProjectState {
    pub fn version(&self) -> u64 {
        match self {
            ProjectState::Absent => 0,
            ProjectState::Live(p) | ProjectState::Deleted(p) => p.version,
        }
    }
}

/// What a writer asks of a project.
#[derive(Debug, Clone, PartialEq)]
pub enum ProjectCommand {
    Create(ProjectCreated),
    Update(ProjectChanges),
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProjectError {
    #[error("a project with this id already exists")]
    AlreadyExists,
    #[error("no such project")]
    NotFound,
}

/// Decides what `command` means for a project in `state`. As for agents, an
/// update that changes nothing yields no event.
pub fn decide(
    state: &ProjectState,
    command: ProjectCommand,
) -> Result<Vec<ProjectEvent>, ProjectError> {
    match (state, command) {
        (ProjectState::Absent, ProjectCommand::Create(c)) => Ok(vec![ProjectEvent::Created(c)]),
        (_, ProjectCommand::Create(_)) => Err(ProjectError::AlreadyExists),
        (ProjectState::Live(p), ProjectCommand::Update(patch)) => {
            let changes = ProjectChanges {
                name: patch.name.filter(|n| *n != p.name),
                description: patch.description.filter(|d| *d != p.description),
            };
            Ok(if changes == ProjectChanges::default() {
                vec![]
            } else {
                vec![ProjectEvent::Updated(changes)]
            })
        }
        (ProjectState::Live(_), ProjectCommand::Delete) => Ok(vec![ProjectEvent::Deleted]),
        (ProjectState::Absent | ProjectState::Deleted(_), _) => Err(ProjectError::NotFound),
    }
}

pub fn evolve(state: ProjectState, recorded: &Recorded<ProjectEvent>) -> ProjectState {
    let meta = &recorded.meta;
    match (state, &recorded.event) {
        (ProjectState::Absent, ProjectEvent::Created(c)) => ProjectState::Live(Project {
            id: meta.aggregate_id,
            name: c.name.clone(),
            description: c.description.clone(),
            version: meta.aggregate_version,
            created_at: meta.occurred_at,
            updated_at: meta.occurred_at,
            created_by: meta.actor.clone(),
        }),
        (ProjectState::Live(mut p), ProjectEvent::Updated(c)) => {
            apply_change(&mut p.name, &c.name);
            apply_change(&mut p.description, &c.description);
            p.version = meta.aggregate_version;
            p.updated_at = meta.occurred_at;
            ProjectState::Live(p)
        }
        (ProjectState::Live(mut p), ProjectEvent::Deleted) => {
            p.version = meta.aggregate_version;
            p.updated_at = meta.occurred_at;
            ProjectState::Deleted(p)
        }
        (state, _) => state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::EventMeta;

    fn rec(version: u64, event: ProjectEvent) -> Recorded<ProjectEvent> {
        Recorded {
            meta: EventMeta {
                aggregate_id: Uuid::nil(),
                aggregate_version: version,
                occurred_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                actor: "a".into(),
                request_id: "r".into(),
            },
            event,
        }
    }

    fn created() -> ProjectEvent {
        ProjectEvent::Created(ProjectCreated {
            name: Name::parse("name", "P").unwrap(),
            description: Description::empty(),
        })
    }

    #[test]
    fn project_commands_follow_its_life() {
        let live = evolve(ProjectState::Absent, &rec(1, created()));
        let rename = ProjectChanges {
            name: Some(Name::parse("name", "Q").unwrap()),
            description: None,
        };
        assert_eq!(
            decide(&live, ProjectCommand::Update(rename.clone())),
            Ok(vec![ProjectEvent::Updated(rename)])
        );
        let same = ProjectChanges {
            name: Some(Name::parse("name", "P").unwrap()),
            description: None,
        };
        assert_eq!(decide(&live, ProjectCommand::Update(same)), Ok(vec![]));
        assert_eq!(
            decide(&live, ProjectCommand::Delete),
            Ok(vec![ProjectEvent::Deleted])
        );
        let gone = evolve(live, &rec(2, ProjectEvent::Deleted));
        assert_eq!(
            decide(&gone, ProjectCommand::Delete),
            Err(ProjectError::NotFound)
        );
        assert_eq!(gone.version(), 2);
        assert_eq!(
            decide(
                &ProjectState::Absent,
                ProjectCommand::Update(ProjectChanges::default())
            ),
            Err(ProjectError::NotFound)
        );
    }

    #[test]
    fn a_project_exists_from_creation_until_deletion() {
        let created = ProjectEvent::Created(ProjectCreated {
            name: Name::parse("name", "P").unwrap(),
            description: Description::empty(),
        });
        let s = evolve(ProjectState::Absent, &rec(1, created));
        assert!(s.exists());
        let s = evolve(s, &rec(2, ProjectEvent::Deleted));
        assert!(!s.exists());
        assert!(!ProjectState::Absent.exists());
    }
}
