-- Access policies, tokens (secret only as SHA-256) and the audit log of admin changes.
CREATE TABLE access_policies (
    id              uuid PRIMARY KEY,
    org_id          text NOT NULL,
    name            text NOT NULL,
    display_name    text NOT NULL,
    scopes          text[] NOT NULL,
    realms          jsonb NOT NULL,
    allowed_subnets text[] NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);
CREATE INDEX access_policies_page ON access_policies (org_id, created_at, id);

CREATE TABLE tokens (
    id               uuid PRIMARY KEY,
    org_id           text NOT NULL,
    access_policy_id uuid NOT NULL REFERENCES access_policies (id) ON DELETE CASCADE,
    name             text NOT NULL,
    display_name     text NOT NULL,
    secret_sha256    bytea NOT NULL CHECK (length(secret_sha256) = 32),
    expires_at       timestamptz,
    first_used_at    timestamptz,
    last_used_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);
CREATE INDEX tokens_policy ON tokens (access_policy_id);
CREATE INDEX tokens_page ON tokens (org_id, created_at, id);

CREATE TABLE audit_log (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    org_id        text NOT NULL,
    actor         text NOT NULL,           -- token id of the caller, or 'cli'
    action        text NOT NULL,           -- e.g. accesspolicy.create
    resource_type text NOT NULL,
    resource_id   text NOT NULL,
    before        jsonb,
    after         jsonb
);
CREATE INDEX audit_log_org ON audit_log (org_id, id);

-- Every change that matters to an authorization decision is announced on one channel;
-- each replica's cache reloads just that row. Usage timestamps are not announced.
CREATE FUNCTION gateway_notify_change() RETURNS trigger AS $$
DECLARE
    rec record;
BEGIN
    IF TG_OP = 'DELETE' THEN rec := OLD; ELSE rec := NEW; END IF;
    PERFORM pg_notify('gateway_changes', json_build_object('table', TG_TABLE_NAME, 'op', TG_OP, 'id', rec.id)::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER access_policies_notify AFTER INSERT OR UPDATE OR DELETE ON access_policies
    FOR EACH ROW EXECUTE FUNCTION gateway_notify_change();
CREATE TRIGGER tokens_notify_insert_delete AFTER INSERT OR DELETE ON tokens
    FOR EACH ROW EXECUTE FUNCTION gateway_notify_change();
CREATE TRIGGER tokens_notify_update AFTER UPDATE OF name, display_name, expires_at, secret_sha256, access_policy_id ON tokens
    FOR EACH ROW EXECUTE FUNCTION gateway_notify_change();
