-- Secrets of the web page shared by every replica: the session-cookie encryption key.
-- Created once by the first replica that starts; a cookie sealed by one replica opens on all.
CREATE TABLE web_secrets (
    name       text PRIMARY KEY,
    value      bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
