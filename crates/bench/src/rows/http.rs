//! Driving a server over HTTP: a closed loop of requests, the status
//! check every request makes, and whether a route is built yet.

use anyhow::bail;
use reqwest::StatusCode;

use super::Plan;
use crate::load::{Run, closed_loop};
use crate::sandbox::Server;

/// An error unless `status` is `want`.
pub fn expect(status: StatusCode, want: StatusCode, what: &str) -> anyhow::Result<()> {
    if status != want {
        bail!("{what} answered {status}");
    }
    Ok(())
}

/// `clients` clients in a closed loop, each operation the request
/// `request(client, n)` builds, which must answer `want`; each counts
/// `units` (events in a bulk request, else 1).
pub async fn http_loop<F>(
    server: &Server,
    plan: &Plan,
    clients: usize,
    want: StatusCode,
    units: u64,
    what: &'static str,
    request: F,
) -> Run
where
    F: Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let client = server.client.clone();
    closed_loop(clients, plan.warmup, plan.measure, move |_, n| {
        let req = request(&client, n);
        async move {
            let r = req.send().await?;
            expect(r.status(), want, what)?;
            r.bytes().await?;
            Ok(units)
        }
    })
    .await
}

/// Whether a route exists: a 404 or 405, or a 400 from the `{id}` route
/// swallowing the path while the spec does not list it, means not yet.
pub async fn route_built(
    server: &Server,
    path: &str,
    query: &str,
) -> anyhow::Result<Option<String>> {
    let r = server.get(&format!("{path}?{query}")).send().await?;
    let status = r.status();
    if status.is_success() {
        return Ok(None);
    }
    let body = r.text().await.unwrap_or_default();
    let spec: serde_json::Value = server
        .client
        .get(server.url("/api/v1/openapi.json"))
        .send()
        .await?
        .json()
        .await
        .unwrap_or_default();
    let listed = spec["paths"].get(path).is_some();
    match status.as_u16() {
        404 | 405 => Ok(Some(format!("{path} answered {status}"))),
        400 if !listed => Ok(Some(format!(
            "{path} is not in the OpenAPI spec (answered {status})"
        ))),
        _ => bail!("{path}?{query} answered {status}: {body}"),
    }
}
