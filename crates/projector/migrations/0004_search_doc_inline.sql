-- The search document, computed at a third of the cost.
--
-- `agent_search_doc` called `array_to_string` and `agent_tags_text` (a
-- subquery over `jsonb_each_text`), both only STABLE, so PostgreSQL could
-- not inline it into the generated column: every inserted or updated agent
-- paid for SQL function calls, about 40 µs of the ~100 µs an agent costs to
-- project. The same words now come from IMMUTABLE built-ins alone, which
-- lets the whole body be inlined (~15 µs):
-- * capabilities: `array_to_tsvector(capabilities)::text` quotes each one,
--   and the `simple` parser splits that text into words again, as it did
--   the space-joined list (empty and null items, which the API never
--   writes, are dropped first: `array_to_tsvector` refuses them);
-- * tags: `jsonb_to_tsvector(..., '["string", "key"]')` takes the words of
--   every key and value, as `agent_tags_text` did.
-- Weights stay: name A, type and capabilities B, tags C, description D.

-- The column goes first (its index with it) and is added back below, so
-- every existing row is recomputed with the new body.
ALTER TABLE agents DROP COLUMN search_doc;

CREATE OR REPLACE FUNCTION agent_search_doc(name text, type text, description text, capabilities text[], tags jsonb)
    RETURNS tsvector
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN setweight(to_tsvector('simple'::regconfig, name), 'A')
        || setweight(to_tsvector('simple'::regconfig, type)
            || to_tsvector('simple'::regconfig,
                array_to_tsvector(array_remove(array_remove(capabilities, ''), NULL))::text), 'B')
        || setweight(jsonb_to_tsvector('simple'::regconfig, tags, '["string", "key"]'), 'C')
        || setweight(to_tsvector('simple'::regconfig, description), 'D');

DROP FUNCTION agent_tags_text(jsonb);

ALTER TABLE agents
    ADD COLUMN search_doc tsvector
        GENERATED ALWAYS AS (agent_search_doc(name, type, description, capabilities, tags)) STORED;
CREATE INDEX agents_search_doc ON agents USING gin (search_doc);
