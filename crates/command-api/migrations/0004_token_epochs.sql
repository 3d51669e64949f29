-- Tokens that end when their user changes. Every token carries the epoch
-- its user had when it was issued, and is refused once that epoch moves on:
-- changing a user's role or password gives them a new epoch, deleting them
-- removes theirs. Epochs come from one sequence, so a user deleted and
-- created again never gets back an epoch that an old token carries.
CREATE SEQUENCE IF NOT EXISTS users_token_epoch;
ALTER TABLE users
    ADD COLUMN IF NOT EXISTS token_epoch bigint NOT NULL DEFAULT nextval('users_token_epoch');

-- Every process caches each user's (epoch, role) and listens on
-- `ymera_users` (infra::sessions): any change to a user, whoever makes it
-- (the API, the CLI or an operator's SQL), tells them all to forget it when
-- the change commits.
CREATE OR REPLACE FUNCTION users_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('ymera_users', OLD.username);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM pg_notify('ymera_users', NEW.username);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS users_changed ON users;
CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION users_notify_change();
