-- Grafana Cloud fields returned to clients exactly as written (issue 14).
--
-- `allowed_subnets` and the selectors inside `realms` now hold the text as the admin sent it
-- (`10.1.2.3/8`, `{ env != "dev" }`); the gateway parses them on load and enforces the parsed
-- form. Rows written before keep their canonical text, which is equally valid input.
-- `attributes` is Cloud's free-form policy attributes object (lokiQueryPolicy, pdcConfiguration):
-- stored and returned, not enforced.
ALTER TABLE access_policies ADD COLUMN attributes jsonb;

-- Grafana's team API carries an email per team (`POST /api/teams {"name", "email"}`): kept and returned.
ALTER TABLE teams ADD COLUMN email text NOT NULL DEFAULT '';
