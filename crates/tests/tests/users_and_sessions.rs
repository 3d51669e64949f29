//! Logins that cannot grow memory, and tokens that end when their user
//! changes: deleted, demoted and re-passworded users' older tokens are
//! refused by every role process within a second; self-service password
//! changes, admin user updates and the `ymera user` commands.

use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use tests::{Sandbox, TestApp, eventually, process};
use ymera::Role;

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

async fn login_from(
    client: &reqwest::Client,
    base: &str,
    address: &str,
    username: &str,
    password: &str,
) -> reqwest::Response {
    client
        .post(format!("{base}/api/v1/auth/login"))
        .header("x-forwarded-for", address)
        .json(&json!({ "username": username, "password": password }))
        .send()
        .await
        .expect("login request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_with_huge_usernames_do_not_grow_memory() {
    let sandbox = Sandbox::new().await;
    let (child, addr) = process::spawn_with(
        &sandbox,
        "command-api",
        &[("YMERA_TRUST_FORWARDED_FOR", "true")],
    );
    let pid = child.id().expect("a pid");
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(60), "the process to serve", || async {
        let r = client.get(format!("{base}/livez")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let r = login_from(&client, &base, "10.0.0.1", "admin", tests::ADMIN_PASSWORD).await;
    assert_eq!(r.status(), 200, "a warm-up login");
    let before = rss_kib(pid);

    // 1,500 logins with 200 KiB usernames: half from one address (soon
    // refused by its limit), half each from an address of its own.
    let huge = "u".repeat(200 * 1024);
    let statuses: Vec<u16> = futures::stream::iter(0..1_500)
        .map(|i| {
            let (client, base, huge) = (&client, &base, &huge);
            async move {
                let address = if i % 2 == 0 {
                    "10.1.0.1".to_owned()
                } else {
                    format!("10.2.{}.{}", i / 256, i % 256)
                };
                let username = format!("{i}{huge}");
                login_from(client, base, &address, &username, "wrong-password")
                    .await
                    .status()
                    .as_u16()
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "every attempt fails as a login: {:?}",
        statuses.iter().find(|s| **s != 401 && **s != 429)
    );
    assert!(statuses.contains(&401) && statuses.contains(&429));

    let after = rss_kib(pid);
    let growth_mib = after.saturating_sub(before) / 1024;
    println!("command-api RSS {before} KiB -> {after} KiB (+{growth_mib} MiB)");
    assert!(growth_mib < 64, "RSS grew by {growth_mib} MiB");
    let r = login_from(&client, &base, "10.9.9.9", "admin", tests::ADMIN_PASSWORD).await;
    assert_eq!(r.status(), 200, "a normal login still works");
}

const PASSWORD: &str = "a-long-enough-password";

/// Creates `username` with `role` through the API and logs them in.
async fn user_with_token(app: &TestApp, admin: &str, username: &str, role: &str) -> String {
    let r = app
        .request(Method::POST, "/api/v1/users", Some(admin))
        .json(&json!({ "username": username, "password": PASSWORD, "role": role }))
        .send()
        .await
        .expect("POST /users");
    assert_eq!(r.status(), 201, "create {username}");
    app.login(username, PASSWORD).await
}

async fn status(app: &TestApp, method: Method, path: &str, token: &str) -> u16 {
    let request = app.request(method.clone(), path, Some(token));
    let request = if method == Method::POST {
        request.json(&tests::agent_body("probe"))
    } else {
        request
    };
    let r = request.send().await.expect("a request");
    let code = r.status().as_u16();
    if code >= 400 {
        eprintln!(
            "{method} {path}: {code} {}",
            r.text().await.unwrap_or_default()
        );
    }
    code
}

/// Waits at most a second for `path` to refuse `token` with `expected`.
async fn refused_within_a_second(
    app: &TestApp,
    method: Method,
    path: &str,
    token: &str,
    expected: u16,
) {
    let started = Instant::now();
    eventually(
        Duration::from_secs(1),
        &format!("{method} {path} on {} to answer {expected}", app.base),
        || async { (status(app, method.clone(), path, token).await == expected).then_some(()) },
    )
    .await;
    println!(
        "{method} {path} on {}: {expected} after {:?}",
        app.base,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_demoted_and_repassworded_users_lose_their_tokens_on_every_process() {
    let sandbox = Sandbox::new().await;
    let writer = sandbox.start(Role::Command).await;
    let reader = sandbox.start(Role::Query).await;
    let admin = writer.admin_token().await;
    let deleted = user_with_token(&writer, &admin, "dora", "editor").await;
    let demoted = user_with_token(&writer, &admin, "dave", "admin").await;
    let repassworded = user_with_token(&writer, &admin, "pat", "editor").await;

    // Every token works on both processes (and is cached there).
    for token in [&deleted, &demoted, &repassworded] {
        assert_eq!(
            status(&writer, Method::POST, "/api/v1/agents", token).await,
            201
        );
        assert_eq!(
            status(&reader, Method::GET, "/api/v1/agents", token).await,
            200
        );
    }
    assert_eq!(
        status(&writer, Method::GET, "/api/v1/users", &demoted).await,
        200
    );

    let r = writer
        .request(Method::DELETE, "/api/v1/users/dora", Some(&admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = writer
        .request(Method::PUT, "/api/v1/users/dave", Some(&admin))
        .json(&json!({ "role": "viewer" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = writer
        .request(Method::POST, "/api/v1/auth/password", Some(&repassworded))
        .json(&json!({ "current_password": PASSWORD, "new_password": "another-long-password" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    for token in [&deleted, &demoted, &repassworded] {
        refused_within_a_second(&writer, Method::POST, "/api/v1/agents", token, 401).await;
        refused_within_a_second(&reader, Method::GET, "/api/v1/agents", token, 401).await;
    }
    assert_eq!(
        status(&writer, Method::GET, "/api/v1/users", &demoted).await,
        401
    );
    // The admin's own token was not touched.
    assert_eq!(
        status(&reader, Method::GET, "/api/v1/agents", &admin).await,
        200
    );

    // The demoted user logs in again, with the new role.
    let viewer = writer.login("dave", PASSWORD).await;
    assert_eq!(
        status(&writer, Method::GET, "/api/v1/users", &viewer).await,
        403
    );
    assert_eq!(
        status(&reader, Method::GET, "/api/v1/agents", &viewer).await,
        200
    );
    // The new password works at once on every process; the old one not.
    let r = writer
        .request(Method::POST, "/api/v1/auth/login", None)
        .json(&json!({ "username": "pat", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let fresh = writer.login("pat", "another-long-password").await;
    assert_eq!(
        status(&reader, Method::GET, "/api/v1/agents", &fresh).await,
        200
    );
    assert_eq!(
        status(&writer, Method::POST, "/api/v1/agents", &fresh).await,
        201
    );
    // A user created again under a deleted name does not revive old tokens.
    let again = user_with_token(&writer, &admin, "dora", "editor").await;
    assert_eq!(
        status(&reader, Method::GET, "/api/v1/agents", &again).await,
        200
    );
    assert_eq!(
        status(&reader, Method::GET, "/api/v1/agents", &deleted).await,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_needs_the_current_password_and_a_valid_new_one() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let token = user_with_token(&app, &admin, "vera", "viewer").await;
    let change = |body: Value| {
        app.request(Method::POST, "/api/v1/auth/password", Some(&token))
            .json(&body)
            .send()
    };
    let r =
        change(json!({ "current_password": "not-my-password", "new_password": "a-new-password" }))
            .await
            .unwrap();
    assert_eq!(r.status(), 422);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "current_password");
    let r = change(json!({ "current_password": PASSWORD, "new_password": "short" }))
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let r = change(json!({ "current_password": PASSWORD }))
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let r = app
        .request(Method::POST, "/api/v1/auth/password", None)
        .json(&json!({ "current_password": PASSWORD, "new_password": "a-new-password" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Nothing changed so far.
    assert_eq!(
        status(&app, Method::GET, "/api/v1/agents", &token).await,
        200
    );

    let r = change(json!({ "current_password": PASSWORD, "new_password": "a-new-password" }))
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    refused_within_a_second(&app, Method::GET, "/api/v1/agents", &token, 401).await;
    let fresh = app.login("vera", "a-new-password").await;
    assert_eq!(
        status(&app, Method::GET, "/api/v1/agents", &fresh).await,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_change_roles_and_passwords_but_never_remove_the_last_admin() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let editor = user_with_token(&app, &admin, "eve", "editor").await;
    let put = |path: &str, token: &str, body: Value| {
        app.request(Method::PUT, path, Some(token))
            .json(&body)
            .send()
    };
    assert_eq!(
        put("/api/v1/users/eve", &editor, json!({ "role": "admin" }))
            .await
            .unwrap()
            .status(),
        403,
        "only admins"
    );
    assert_eq!(
        put("/api/v1/users/eve", &admin, json!({}))
            .await
            .unwrap()
            .status(),
        422
    );
    assert_eq!(
        put("/api/v1/users/eve", &admin, json!({ "password": "short" }))
            .await
            .unwrap()
            .status(),
        422
    );
    assert_eq!(
        put("/api/v1/users/nobody", &admin, json!({ "role": "viewer" }))
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        put("/api/v1/users/admin", &admin, json!({ "role": "viewer" }))
            .await
            .unwrap()
            .status(),
        409,
        "the last admin cannot be demoted"
    );
    // Setting the role a user has already changes nothing.
    let r = put("/api/v1/users/eve", &admin, json!({ "role": "editor" }))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        status(&app, Method::GET, "/api/v1/agents", &editor).await,
        200
    );

    let r = put(
        "/api/v1/users/eve",
        &admin,
        json!({ "role": "viewer", "password": "eves-new-password" }),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let user: Value = r.json().await.unwrap();
    assert_eq!(user["username"], "eve");
    assert_eq!(user["role"], "viewer");
    assert!(user.get("password_hash").is_none());
    refused_within_a_second(&app, Method::GET, "/api/v1/agents", &editor, 401).await;
    let viewer = app.login("eve", "eves-new-password").await;
    assert_eq!(
        status(&app, Method::POST, "/api/v1/agents", &viewer).await,
        403
    );
}

/// Runs `ymera user <args>` against the sandbox's database.
async fn ymera_user(sandbox: &Sandbox, args: &[&str], password: Option<&str>) -> (bool, String) {
    let mut command = tokio::process::Command::new(process::ymera_bin());
    command
        .arg("user")
        .args(args)
        .env("YMERA_DATABASE_URL", &sandbox.settings.db.database_url)
        .env("RUST_LOG", "warn")
        .env_remove("YMERA_NEW_USER_PASSWORD");
    if let Some(p) = password {
        command.env("YMERA_NEW_USER_PASSWORD", p);
    }
    let out = command.output().await.expect("run ymera user");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_commands_list_delete_and_set_passwords() {
    let sandbox = Sandbox::new().await;
    let app = sandbox.start(Role::All).await;
    let admin = app.admin_token().await;
    let token = user_with_token(&app, &admin, "cleo", "editor").await;
    let other = user_with_token(&app, &admin, "carl", "viewer").await;
    assert_eq!(
        status(&app, Method::POST, "/api/v1/agents", &token).await,
        201
    );
    assert_eq!(
        status(&app, Method::GET, "/api/v1/agents", &other).await,
        200
    );

    let (ok, listed) = ymera_user(&sandbox, &["list"], None).await;
    assert!(ok, "{listed}");
    for (name, role) in [("admin", "admin"), ("cleo", "editor"), ("carl", "viewer")] {
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with(name) && l.contains(role)),
            "{name} as {role} in:\n{listed}"
        );
    }

    let (ok, out) = ymera_user(
        &sandbox,
        &["passwd", "--username", "cleo"],
        Some("cleos-new-password"),
    )
    .await;
    assert!(ok, "{out}");
    refused_within_a_second(&app, Method::POST, "/api/v1/agents", &token, 401).await;
    let fresh = app.login("cleo", "cleos-new-password").await;
    assert_eq!(
        status(&app, Method::POST, "/api/v1/agents", &fresh).await,
        201
    );
    let (ok, out) = ymera_user(&sandbox, &["passwd", "--username", "cleo"], Some("short")).await;
    assert!(!ok, "a short password is refused: {out}");
    let (ok, out) = ymera_user(
        &sandbox,
        &["passwd", "--username", "nobody"],
        Some(PASSWORD),
    )
    .await;
    assert!(!ok && out.contains("no such user"), "{out}");

    let (ok, out) = ymera_user(&sandbox, &["delete", "--username", "carl"], None).await;
    assert!(ok, "{out}");
    refused_within_a_second(&app, Method::GET, "/api/v1/agents", &other, 401).await;
    let (ok, out) = ymera_user(&sandbox, &["delete", "--username", "admin"], None).await;
    assert!(!ok && out.contains("last admin"), "{out}");
    let (_, listed) = ymera_user(&sandbox, &["list"], None).await;
    assert!(!listed.contains("carl"), "{listed}");
    assert!(listed.contains("admin"), "{listed}");
}
