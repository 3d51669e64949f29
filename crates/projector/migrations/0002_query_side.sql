-- The query side's read models: full-text and fuzzy search over agents, and
-- the projected event log behind history, as_of and analytics. Like 0001,
-- statements are unqualified (the migrator sets search_path to the target
-- schema, then public).

CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public;

-- What search matches, as functions so the generated columns below can use
-- them (array_to_string and jsonb_each_text are only STABLE in general, but
-- for text[] and jsonb they depend on nothing but their input). The bodies
-- are SQL-standard, so they are bound at creation and do not depend on the
-- search_path of whoever later writes a row.
CREATE FUNCTION agent_tags_text(tags jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN coalesce((SELECT string_agg(key || ' ' || value, ' ') FROM jsonb_each_text(tags)), '');

CREATE FUNCTION agent_search_doc(name text, type text, description text, capabilities text[], tags jsonb)
    RETURNS tsvector
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN setweight(to_tsvector('simple'::regconfig, name), 'A')
        || setweight(to_tsvector('simple'::regconfig, type || ' ' || array_to_string(capabilities, ' ')), 'B')
        || setweight(to_tsvector('simple'::regconfig, agent_tags_text(tags)), 'C')
        || setweight(to_tsvector('simple'::regconfig, description), 'D');

CREATE FUNCTION agent_search_text(name text, type text, description text, capabilities text[], tags jsonb)
    RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN lower(name || ' ' || type || ' ' || array_to_string(capabilities, ' ') || ' '
        || agent_tags_text(tags) || ' ' || description);

-- Maintained by PostgreSQL itself on every insert and update, so neither
-- the projector nor anything that seeds the table can forget them.
ALTER TABLE agents
    ADD COLUMN search_doc tsvector
        GENERATED ALWAYS AS (agent_search_doc(name, type, description, capabilities, tags)) STORED,
    ADD COLUMN search_text text
        GENERATED ALWAYS AS (agent_search_text(name, type, description, capabilities, tags)) STORED;

-- Word prefixes (`'scou':*`) through the tsvector; typos through trigram
-- word similarity (`q <% search_text`).
CREATE INDEX agents_search_doc ON agents USING gin (search_doc);
CREATE INDEX agents_search_trgm ON agents USING gin (search_text gin_trgm_ops);

-- Every applied event, written by the projector in the same transaction as
-- the rows it changes: the basis of history, as_of and analytics.
CREATE TABLE events (
    seq               bigint PRIMARY KEY,
    event_id          uuid NOT NULL,
    event_type        text NOT NULL,
    schema_version    integer NOT NULL,
    aggregate_type    text NOT NULL,
    aggregate_id      uuid NOT NULL,
    aggregate_version bigint NOT NULL,
    occurred_at       timestamptz NOT NULL,
    actor             text NOT NULL,
    request_id        text NOT NULL,
    data              jsonb NOT NULL
);
CREATE INDEX events_by_aggregate ON events (aggregate_id, seq);
CREATE INDEX events_by_time ON events (occurred_at, seq);
-- Analytics filtered by project: the agents ever placed in a project.
CREATE INDEX events_agent_project ON events ((data ->> 'project_id'))
    WHERE aggregate_type = 'agent';
