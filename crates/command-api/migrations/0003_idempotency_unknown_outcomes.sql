-- A keyed write whose outcome is unknown (a 5xx, or the request timed out
-- after its append may have happened) is no longer forgotten: its row stays,
-- marked `unknown`, so the same key with another request is still refused
-- and the same request runs again under the same names, finding in the log
-- whatever the first attempt stored.
ALTER TABLE idempotency_keys
    ADD COLUMN IF NOT EXISTS unknown boolean NOT NULL DEFAULT false,
    -- When the attempt now being served claimed the key. `created_at` stays
    -- the key's first use: it names what the write appends, so it must not
    -- move between attempts.
    ADD COLUMN IF NOT EXISTS claimed_at timestamptz NOT NULL DEFAULT now();
