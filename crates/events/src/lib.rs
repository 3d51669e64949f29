//! YMERA's domain, free of IO.
//!
//! Everything the system knows is a sequence of past-tense events. This crate
//! defines them, the envelope they travel in, the subjects they are stored
//! under, and the two pure functions every aggregate is made of:
//!
//! * `decide(state, command) -> Result<events, error>`: what a command means
//!   given the state rebuilt from the log;
//! * `evolve(state, event) -> state`: how one event changes that state. It
//!   cannot fail: an event is a fact that already happened.
//!
//! The write side and the query side (history, `as_of`) fold events with the
//! same `evolve`, so both agree on what an aggregate looked like at any time.
//! There is no tokio, sqlx or NATS here: given/when/then tests run without a
//! server.

pub mod agent;
pub mod aggregate;
pub mod envelope;
pub mod fields;
pub mod ids;
pub mod project;

pub use aggregate::Aggregate;
pub use envelope::{AggregateType, DecodeError, Envelope, EventMeta, Recorded};
pub use fields::FieldError;
pub use ids::{AgentId, ProjectId};

/// How a stored subject is formed: `<prefix>.<aggregate type>.<aggregate
/// id>` on a log of one partition, and `<prefix>.<aggregate type>.<aggregate
/// id>.<partition>` on a log split `partitions` ways (the partition of the
/// id, [`partition_of`]).
///
/// One subject per aggregate lets JetStream guard every append with
/// `Nats-Expected-Last-Subject-Sequence`, and lets a loader read exactly one
/// aggregate's events. The partition token lets each partition's consumer
/// be given only its own events by the server ([`partition_subjects`]); it
/// comes last so that every filter of the unsplit layout that ends in `>`
/// matches both.
pub fn subject(
    prefix: &str,
    aggregate_type: AggregateType,
    id: uuid::Uuid,
    partitions: u32,
) -> String {
    let kind = aggregate_type.as_str();
    if partitions > 1 {
        let partition = partition_of(&id.to_string(), partitions);
        format!("{prefix}.{kind}.{id}.{partition}")
    } else {
        format!("{prefix}.{kind}.{id}")
    }
}

/// The partition (among `count`) of the aggregate whose id is `id`, as
/// its subject spells it: FNV-1a (32 bits) of the id's text, modulo
/// `count`. The function of NATS's own subject mapping
/// `{{partition(count, ...)}}`, so the split stays where it is should the
/// stream ever compute it in a subject transform.
pub fn partition_of(id: &str, count: u32) -> u32 {
    let hash = id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash % count.max(1)
}

/// The aggregate id a stored subject names (see [`subject`]), on a log
/// split `partitions` ways; `None` when the subject has not that shape's
/// last tokens.
pub fn aggregate_id_of(subject: &str, partitions: u32) -> Option<&str> {
    let mut tokens = subject.rsplit('.');
    if partitions > 1 {
        tokens.next()?;
    }
    tokens.next()
}

/// The wildcard that matches every event of one aggregate, whatever its
/// type, on a log split `partitions` ways.
pub fn aggregate_subjects(prefix: &str, id: uuid::Uuid, partitions: u32) -> String {
    if partitions > 1 {
        format!(
            "{prefix}.*.{id}.{}",
            partition_of(&id.to_string(), partitions)
        )
    } else {
        format!("{prefix}.*.{id}")
    }
}

/// The wildcard that matches every event of partition `index` of a log
/// split in several (see [`subject`]).
pub fn partition_subjects(prefix: &str, index: u32) -> String {
    format!("{prefix}.*.*.{index}")
}

/// The wildcard that matches every event of one aggregate type, however
/// the log is split.
pub fn type_subjects(prefix: &str, aggregate_type: AggregateType) -> String {
    format!("{prefix}.{}.>", aggregate_type.as_str())
}

/// The wildcard that matches every event of the system under `prefix`.
pub fn all_subjects(prefix: &str) -> String {
    format!("{prefix}.>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_partition_keeps_the_subject_of_an_unsplit_log() {
        let id = uuid::Uuid::nil();
        assert_eq!(
            subject("p", AggregateType::Agent, id, 1),
            format!("p.agent.{id}")
        );
        assert_eq!(
            aggregate_id_of(&format!("p.agent.{id}"), 1),
            Some(id.to_string().as_str())
        );
    }

    #[test]
    fn a_split_log_carries_the_partition_last() {
        let id = uuid::Uuid::from_u128(7);
        let k = partition_of(&id.to_string(), 4);
        let subject = subject("p", AggregateType::Project, id, 4);
        assert_eq!(subject, format!("p.project.{id}.{k}"));
        assert_eq!(aggregate_id_of(&subject, 4), Some(id.to_string().as_str()));
        assert_eq!(aggregate_subjects("p", id, 4), format!("p.*.{id}.{k}"));
    }

    #[test]
    fn partitions_follow_fnv_1a() {
        // FNV-1a of "a" is 0xe40c292c.
        assert_eq!(partition_of("a", 1 << 31), 0xe40c_292c % (1 << 31));
        assert_eq!(partition_of("anything", 1), 0);
    }
}
