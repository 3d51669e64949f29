-- Typo tolerance through a dictionary of the words agents contain, instead
-- of a trigram index over every agent's whole text.
--
-- The trigram GIN index on `search_text` held ~150 trigrams per agent: it
-- halved the rate at which the projector could insert agents, and matching
-- `q <% search_text` had to compute word similarity row by row (a quarter
-- of a second for a common word on 200k agents). Now a misspelt word of `q`
-- is first looked up in `search_words` (one row per distinct word, trigram
-- indexed, small), and the close words found there join the full-text query
-- as alternatives: every match goes through `agents_search_doc`.

DROP INDEX agents_search_trgm;
ALTER TABLE agents DROP COLUMN search_text;
DROP FUNCTION agent_search_text(text, text, text, text[], jsonb);

-- Every word of four or more characters that is not a number, as it
-- appears in `search_doc` (lowercased by the `simple` configuration).
-- Append-only: a word that no agent contains any more only widens a query
-- to an alternative that matches nothing. A rebuild starts it afresh.
CREATE TABLE search_words (
    word text PRIMARY KEY
);
CREATE INDEX search_words_trgm ON search_words USING gin (word gin_trgm_ops);

-- Kept by PostgreSQL itself, once per statement (the projector writes a
-- batch of agents in one statement), for whoever writes agents. The table
-- is named through the schema of the table that fired, so a rebuild into a
-- fresh schema fills its own dictionary.
CREATE FUNCTION agents_add_search_words() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format(
        'INSERT INTO %I.search_words (word)
         SELECT DISTINCT w.lexeme FROM new_agents, unnest(new_agents.search_doc) AS w
         WHERE length(w.lexeme) BETWEEN 4 AND 64 AND w.lexeme !~ ''^[0-9]+$''
         ON CONFLICT DO NOTHING', TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

CREATE TRIGGER agents_search_words_on_insert AFTER INSERT ON agents
    REFERENCING NEW TABLE AS new_agents
    FOR EACH STATEMENT EXECUTE FUNCTION agents_add_search_words();
CREATE TRIGGER agents_search_words_on_update AFTER UPDATE ON agents
    REFERENCING NEW TABLE AS new_agents
    FOR EACH STATEMENT EXECUTE FUNCTION agents_add_search_words();

INSERT INTO search_words (word)
SELECT DISTINCT w.lexeme FROM agents, unnest(agents.search_doc) AS w
WHERE length(w.lexeme) BETWEEN 4 AND 64 AND w.lexeme !~ '^[0-9]+$'
ON CONFLICT DO NOTHING;
