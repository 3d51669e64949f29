//! Writing the read model straight in SQL, around the projector: COPY of
//! generated rows (the raw limits of catch-up and rebuild) and the agents
//! seeded for search and export.

use anyhow::Context;
use sqlx::PgPool;

use super::context::Main;
use crate::data;

/// COPYs the `agents` and `events` rows of agents `from..from + n` into
/// `{schema}agents` and `{schema}events`.
pub async fn copy_rows(
    conn: &mut sqlx::PgConnection,
    schema: &str,
    from: u64,
    n: u64,
) -> anyhow::Result<()> {
    let (agents, events) = data::csv_rows(from, n);
    for (table, columns, csv) in [
        ("agents", data::AGENT_COLUMNS, &agents),
        ("events", data::EVENT_COLUMNS, &events),
    ] {
        let mut copy = conn
            .copy_in_raw(&format!(
                "COPY {schema}{table} ({columns}) FROM STDIN (FORMAT csv)"
            ))
            .await?;
        copy.send(csv.as_bytes()).await?;
        copy.finish().await?;
    }
    Ok(())
}

/// How many agents the read model holds (0 when it cannot say).
pub async fn agents_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// Fills the read model with `count` agents straight in SQL (not through
/// the API): search and export read them; the log does not have them.
pub async fn seed(main: &mut Main, count: u64) -> anyhow::Result<()> {
    if main.seeded >= count {
        return Ok(());
    }
    let chunk = 100_000;
    let mut from = main.seeded;
    while from < count {
        let to = (from + chunk).min(count);
        sqlx::query(
            "INSERT INTO agents (id, name, type, description, status, capabilities, config, tags, \
             project_id, version, created_at, updated_at, created_by, last_seq) \
             SELECT gen_random_uuid(), \
               (ARRAY['scout','planner','coder','reviewer','crawler','summarizer','translator','router'])[1 + i % 8] || ' agent ' || i, \
               (ARRAY['llm','tool','workflow','retriever'])[1 + i % 4], \
               'A ' || (ARRAY['scout','planner','coder','reviewer','crawler','summarizer','translator','router'])[1 + i % 8] \
                 || ' that works for team ' || (ARRAY['atlas','borealis','cygnus','draco','eridanus'])[1 + i % 5] \
                 || ' on batch ' || (i / 1000) || '; it reads, plans and reports back.', \
               (ARRAY['active','inactive','paused','error'])[1 + (i / 7) % 4], \
               ARRAY[(ARRAY['search','code','browse','plan','review','translate'])[1 + i % 6]], \
               '{\"model\": \"m-1\", \"temperature\": 0.2}'::jsonb, \
               jsonb_build_object('env', 'bench', 'team', (ARRAY['atlas','borealis','cygnus','draco','eridanus'])[1 + i % 5]), \
               NULL, 1, now() - i * interval '1 second', now() - i * interval '1 second', 'bench', 0 \
             FROM generate_series($1::bigint, $2::bigint - 1) AS i",
        )
        .bind(from as i64)
        .bind(to as i64)
        .execute(&main.pool)
        .await
        .context("seeding the read model")?;
        from = to;
    }
    sqlx::query("ANALYZE agents").execute(&main.pool).await?;
    main.seeded = count;
    Ok(())
}
