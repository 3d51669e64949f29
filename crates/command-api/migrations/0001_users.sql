-- Accounts that may log in. Not event-sourced: credentials are not domain
-- history, and a password hash must be deletable for good.
CREATE TABLE IF NOT EXISTS users (
    username      text PRIMARY KEY CHECK (length(username) BETWEEN 1 AND 64),
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'editor', 'viewer')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text NOT NULL
);
