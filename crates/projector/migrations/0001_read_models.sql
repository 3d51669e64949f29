-- The read models. Everything here is derived from the event log and can be
-- dropped and rebuilt from it. Statements are unqualified: the migrator runs
-- them with search_path set to the target schema, so a rebuild can build the
-- same tables in a fresh schema.

-- How far the projection has applied the log, moved in the same transaction
-- as the rows it describes.
CREATE TABLE projector_checkpoint (
    name       text PRIMARY KEY,
    last_seq   bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agents (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    type         text NOT NULL,
    description  text NOT NULL,
    status       text NOT NULL,
    capabilities text[] NOT NULL,
    config       jsonb NOT NULL,
    tags         jsonb NOT NULL,
    project_id   uuid,
    version      bigint NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    created_by   text NOT NULL,
    -- Stream sequence of the last event applied to this row.
    last_seq     bigint NOT NULL
);

-- Lists are newest first with a keyset on (created_at, id); each filter has
-- an index that serves that order directly.
CREATE INDEX agents_newest ON agents (created_at DESC, id DESC);
CREATE INDEX agents_by_status ON agents (status, created_at DESC, id DESC);
CREATE INDEX agents_by_type ON agents (type, created_at DESC, id DESC);
CREATE INDEX agents_by_project ON agents (project_id, created_at DESC, id DESC)
    WHERE project_id IS NOT NULL;
CREATE INDEX agents_by_tags ON agents USING gin (tags jsonb_path_ops);

CREATE TABLE projects (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    description text NOT NULL,
    version     bigint NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    created_by  text NOT NULL,
    last_seq    bigint NOT NULL
);
CREATE INDEX projects_newest ON projects (created_at DESC, id DESC);

-- Events the projector could not apply, kept with the reason instead of
-- stalling the projection or dropping them unseen.
CREATE TABLE parked_events (
    seq       bigint PRIMARY KEY,
    subject   text NOT NULL,
    payload   bytea NOT NULL,
    error     text NOT NULL,
    parked_at timestamptz NOT NULL DEFAULT now()
);
