-- Grafana teams (members = Grafana user logins) and data sources with their team LBAC rules.
--
-- A data source's whole rule set lives in one jsonb value, [{"teamId": 1, "rules": ["<tenant>:<selector>"]}],
-- and a team's members in one array: a PUT of the rules or of the members is then one row change and
-- one NOTIFY, so no replica ever applies half of a replaced rule set (a half-deleted set would briefly
-- lift a restriction).
CREATE TABLE teams (
    id         bigserial PRIMARY KEY,
    org_id     text NOT NULL,
    uid        text NOT NULL,
    name       text NOT NULL,
    members    text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT teams_uid_key UNIQUE (org_id, uid),
    CONSTRAINT teams_name_key UNIQUE (org_id, name)
);
CREATE INDEX teams_page ON teams (org_id, created_at, id);

CREATE TABLE datasources (
    id               bigserial PRIMARY KEY,
    org_id           text NOT NULL,
    uid              text NOT NULL,
    name             text NOT NULL,
    type             text NOT NULL CHECK (type IN ('prometheus', 'loki')),
    -- Deleting the policy deletes its data sources: their rules could never apply again.
    access_policy_id uuid NOT NULL REFERENCES access_policies (id) ON DELETE CASCADE,
    lbac_rules       jsonb NOT NULL DEFAULT '[]',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT datasources_uid_key UNIQUE (org_id, uid),
    CONSTRAINT datasources_name_key UNIQUE (org_id, name),
    -- A token must identify one data source per signal, or one data source's rules would leak onto another's.
    CONSTRAINT datasources_policy_key UNIQUE (access_policy_id, type)
);
CREATE INDEX datasources_page ON datasources (org_id, created_at, id);

CREATE TRIGGER teams_notify AFTER INSERT OR UPDATE OR DELETE ON teams
    FOR EACH ROW EXECUTE FUNCTION gateway_notify_change();
CREATE TRIGGER datasources_notify AFTER INSERT OR UPDATE OR DELETE ON datasources
    FOR EACH ROW EXECUTE FUNCTION gateway_notify_change();
