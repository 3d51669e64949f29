//! Search: `GET /agents/search?q=…` from many clients in a closed loop,
//! cycling over a few terms (one misspelt), against `ymera all` with
//! agents seeded straight into the read model.
//!
//! Raw limit: the endpoint's own two statements (`query_api::search`: the
//! dictionary lookup for typos, then the ranked full-text query) through
//! sqlx, at the same concurrency, 50 per page.

use reqwest::StatusCode;

use super::Ctx;
use super::http::{http_loop, route_built};
use super::read_model::seed;
use crate::load::closed_loop;
use crate::report::{Figure, Row};

pub const TARGET: &str = ">= 0.6 ops/s";
const SEARCH_TERMS: [&str; 6] = [
    "scout",
    "planer",
    "summar",
    "translator",
    "cygnus",
    "review",
];

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<Row> {
    ctx.settle().await?;
    let plan = ctx.plan.clone();
    let main = ctx.main().await?;
    let path = "/api/v1/agents/search";
    if let Some(why) = route_built(&main.server, path, "q=scout").await? {
        return Ok(Row::not_built("search", TARGET, why));
    }
    seed(main, plan.seed_agents).await?;
    let url = main.server.url(path);
    let token = main.server.token.clone();
    let ours = http_loop(
        &main.server,
        &plan,
        plan.clients,
        StatusCode::OK,
        1,
        "GET /agents/search",
        move |client, n| {
            let q = SEARCH_TERMS[n as usize % SEARCH_TERMS.len()];
            client.get(&url).query(&[("q", q)]).bearer_auth(&token)
        },
    )
    .await;
    ours.check("ours")?;
    let pool = main.pool.clone();
    let raw = closed_loop(plan.clients, plan.warmup, plan.measure, move |_, n| {
        let q = SEARCH_TERMS[n as usize % SEARCH_TERMS.len()];
        let pool = pool.clone();
        async move {
            // The endpoint's own statements: the dictionary lookup, then
            // the search itself.
            let pairs = infra::http::QueryPairs(vec![("q".to_owned(), q.to_owned())]);
            let mut search =
                query_api::search::Search::parse(&pairs).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            search.expand(&pool).await?;
            search.build("").build().fetch_all(&pool).await?;
            Ok(1)
        }
    })
    .await;
    raw.check("raw")?;
    Ok(Row::ratio(
        "search",
        TARGET,
        Figure::rate(&ours, "ops/s"),
        Figure::rate(&raw, "ops/s"),
        0.6,
        true,
        format!(
            "{} agents seeded straight into the read model with INSERT … SELECT generate_series \
             (not through the API); {} clients cycling q over {SEARCH_TERMS:?}; raw = the \
             endpoint's own two statements (query_api::search: the dictionary lookup for typos, \
             then the ranked full-text query) through sqlx, same concurrency, 50 per page",
            plan.seed_agents, plan.clients,
        ),
    ))
}
