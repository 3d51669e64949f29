-- Responses to writes sent with an Idempotency-Key, so a retry within 24 h
-- gets the first answer instead of writing again, across restarts and well
-- beyond JetStream's duplicate window. Scoped per user.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    actor        text NOT NULL,
    key          text NOT NULL,
    -- SHA-256 of method, path and body: the same key with another request
    -- is refused.
    request_hash bytea NOT NULL,
    -- NULL while the first request is still being served.
    status       smallint,
    headers      jsonb,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (actor, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_by_age ON idempotency_keys (created_at);
