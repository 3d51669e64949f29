-- The index behind analytics filtered by project holds only the agent
-- events that name a project.
--
-- It held an entry for every agent event, most with a NULL key (an agent
-- created without a project, an update that leaves the project alone):
-- one more index insert per projected event that no query reads, since
-- the one lookup (`data ->> 'project_id' = $1`) never matches NULL, and
-- PostgreSQL proves that from the `=` being strict, so the partial index
-- still serves it, with a parameter as with a literal.
DROP INDEX events_agent_project;
CREATE INDEX events_agent_project ON events ((data ->> 'project_id'))
    WHERE aggregate_type = 'agent' AND (data ->> 'project_id') IS NOT NULL;
