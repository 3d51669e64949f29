//! Deleting a project detaches its agents durably: the reaction is driven by
//! the log (the projector's process manager), not by the request, so no
//! restart of any process between the deletion and the detaches loses one,
//! and no redelivery repeats one.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use events::AggregateType;
use reqwest::Method;
use serde_json::{Value, json};
use tests::{Sandbox, TestApp, eventually, header_u64};
use ymera::Role;

fn is_detach(event: &(String, Value)) -> bool {
    event.0 == "agent.updated" && event.1 == json!({"project_id": null})
}

/// A project with `n` agents in it: `(project id, agent ids)`.
async fn project_with_agents(app: &TestApp, token: &str, n: usize) -> (String, Vec<String>) {
    let r = app
        .request(Method::POST, "/api/v1/projects", Some(token))
        .json(&json!({"name": "doomed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let project = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let agents = (0..n)
        .map(|i| json!({"name": format!("member {i}"), "type": "t", "project_id": project}))
        .collect();
    (project.clone(), app.bulk_create(token, agents).await)
}

async fn delete_project(app: &TestApp, token: &str, project: &str) -> u64 {
    let r = app
        .request(
            Method::DELETE,
            &format!("/api/v1/projects/{project}"),
            Some(token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    header_u64(&r, "x-event-seq")
}

/// Waits until every agent's history ends with its detach.
async fn all_detached(app: &TestApp, agents: &[String]) {
    for agent in agents {
        eventually(Duration::from_secs(20), "the agent is detached", || async {
            app.agent_events(agent)
                .await
                .last()
                .is_some_and(is_detach)
                .then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_projects_agents_are_detached_once_whatever_restarts_in_between() {
    let sandbox = Sandbox::new().await;
    let writer = sandbox.start(Role::Command).await;
    let projector = sandbox.start(Role::Projector).await;
    let token = writer.admin_token().await;
    let (project, members) = project_with_agents(&writer, &token, 5).await;
    let written = writer.last_seq().await;
    eventually(
        Duration::from_secs(20),
        "the projection applies the members",
        || async {
            let at = infra::projection::checkpoint(&writer.deps.pool)
                .await
                .unwrap();
            (at >= written).then_some(())
        },
    )
    .await;

    // The projector is down when the project is deleted, and the command
    // API that answers the deletion is killed (SIGKILL) right after.
    projector.stop().await;
    let pool = writer.deps.pool.clone();
    let store = writer.deps.store.clone();
    writer.stop().await;
    let (mut child, addr) = tests::process::spawn(&sandbox, "command-api");
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    eventually(
        Duration::from_secs(20),
        "the command API serves",
        || async {
            let up = client.get(format!("{base}/livez")).send().await;
            up.is_ok_and(|r| r.status() == 200).then_some(())
        },
    )
    .await;
    let r = client
        .delete(format!("{base}/api/v1/projects/{project}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let deleted = header_u64(&r, "x-event-seq");
    let (log_end, _) = store
        .load(&store.subject(AggregateType::Project, project.parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(
        log_end.last().unwrap().seq,
        deleted,
        "the answer is the deletion's own sequence"
    );
    for agent in &members {
        let subject = store.subject(AggregateType::Agent, agent.parse().unwrap());
        let (events, _) = store.load(&subject).await.unwrap();
        assert_eq!(events.len(), 1, "nothing detached {agent} yet");
    }

    // Back up: the projector's process manager finds the deletion in the
    // log and detaches every member.
    let projector = sandbox.start(Role::Projector).await;
    all_detached(&projector, &members).await;

    // Restarted once more, it goes on past that deletion without repeating
    // it: a later deletion is handled, and each member was detached once.
    projector.stop().await;
    let projector = sandbox.start(Role::Projector).await;
    let writer = sandbox.start(Role::Command).await;
    let token = writer.admin_token().await;
    let (later, later_members) = project_with_agents(&writer, &token, 1).await;
    delete_project(&writer, &token, &later).await;
    all_detached(&projector, &later_members).await;
    for agent in &members {
        let h = projector.agent_events(agent).await;
        assert_eq!(
            h.iter().filter(|e| is_detach(e)).count(),
            1,
            "{agent} detached once: {h:?}"
        );
    }
    let last = writer.last_seq().await;
    eventually(
        Duration::from_secs(20),
        "the read model has applied the detaches",
        || async {
            let at = infra::projection::checkpoint(&pool).await.unwrap();
            (at >= last).then_some(())
        },
    )
    .await;
    let still_in: i64 =
        sqlx::query_scalar("SELECT count(*) FROM agents WHERE project_id IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(still_in, 0, "no agent points at a deleted project");
}
