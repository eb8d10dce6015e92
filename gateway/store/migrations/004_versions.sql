-- Row versions for the policy cache (issue 12), and server-side page sessions.
--
-- Every row that matters to an authorization decision carries a version drawn from one sequence:
-- set on INSERT (the column default) and bumped on every UPDATE (a BEFORE trigger, which runs with
-- the row lock held, so successive versions of one row are ordered as their commits are). The
-- change notification carries it; a replica's cache applies a change only when it is newer than the
-- row it holds, so a late notification or an older snapshot never takes the cache back in time.
-- Deletions need no version: ids are never reused, so a deleted id stays deleted.
CREATE SEQUENCE gateway_change_seq;

ALTER TABLE access_policies ADD COLUMN version bigint NOT NULL DEFAULT nextval('gateway_change_seq');
ALTER TABLE tokens ADD COLUMN version bigint NOT NULL DEFAULT nextval('gateway_change_seq');
ALTER TABLE datasources ADD COLUMN version bigint NOT NULL DEFAULT nextval('gateway_change_seq');
ALTER TABLE teams ADD COLUMN version bigint NOT NULL DEFAULT nextval('gateway_change_seq');

CREATE FUNCTION gateway_bump_version() RETURNS trigger AS $$
BEGIN
    NEW.version := nextval('gateway_change_seq');
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER access_policies_version BEFORE UPDATE ON access_policies
    FOR EACH ROW EXECUTE FUNCTION gateway_bump_version();
-- Usage timestamps (first/last used) are not part of the decision: they neither bump nor notify.
CREATE TRIGGER tokens_version BEFORE UPDATE OF name, display_name, expires_at, secret_sha256, access_policy_id
    ON tokens FOR EACH ROW EXECUTE FUNCTION gateway_bump_version();
CREATE TRIGGER datasources_version BEFORE UPDATE ON datasources
    FOR EACH ROW EXECUTE FUNCTION gateway_bump_version();
CREATE TRIGGER teams_version BEFORE UPDATE ON teams
    FOR EACH ROW EXECUTE FUNCTION gateway_bump_version();

CREATE OR REPLACE FUNCTION gateway_notify_change() RETURNS trigger AS $$
DECLARE
    rec record;
BEGIN
    IF TG_OP = 'DELETE' THEN rec := OLD; ELSE rec := NEW; END IF;
    PERFORM pg_notify('gateway_changes', json_build_object(
        'table', TG_TABLE_NAME, 'op', TG_OP, 'id', rec.id,
        'v', CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE rec.version END)::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- Page sessions: the cookie carries a random nonce; only its SHA-256 is stored. Signing out deletes
-- the row (a copied cookie stops working at once), and deleting the token deletes its sessions.
CREATE TABLE web_sessions (
    nonce_sha256 bytea PRIMARY KEY CHECK (length(nonce_sha256) = 32),
    token_id     uuid NOT NULL REFERENCES tokens (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX web_sessions_token ON web_sessions (token_id);
CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);
