-- Search leaves PostgreSQL: each query process keeps its own search index
-- (tantivy), fed from the event log like any other read model.
--
-- What goes is what made every projection write slow: the generated search
-- document and its GIN index (pending-list merges stalled batches), and the
-- dictionary of words kept by a statement trigger. Writing an agent now costs
-- what its row, primary key and filter indexes cost.
DROP TRIGGER IF EXISTS agents_search_words_on_insert ON agents;
DROP TRIGGER IF EXISTS agents_search_words_on_update ON agents;
DROP FUNCTION IF EXISTS agents_add_search_words();
DROP TABLE IF EXISTS search_words;
ALTER TABLE agents DROP COLUMN IF EXISTS search_doc;
DROP FUNCTION IF EXISTS agent_search_doc(text, text, text, text[], jsonb);
