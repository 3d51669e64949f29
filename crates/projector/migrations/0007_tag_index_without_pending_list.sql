-- The tag filter's GIN index takes each new agent's entries straight into
-- the index instead of a pending list.
--
-- With the pending list (GIN's `fastupdate`), entries pile up until the
-- list passes `gin_pending_list_limit` (4 MB), and whichever insert crosses
-- it merges the whole list inline: under a steady write load, a projector
-- batch stalled every few seconds for a tenth of a second, and every write
-- behind it waited to become visible. An agent has a few tags, so entering
-- them directly costs a few index descents per row, evenly. A rebuild makes
-- this index after loading the rows, where the option does not matter.
ALTER INDEX agents_by_tags SET (fastupdate = off);
SELECT gin_clean_pending_list('agents_by_tags'::regclass);
