-- Tempo data sources (issue 27): their team rules are trace selectors ({resource.env="dev"}).
ALTER TABLE datasources DROP CONSTRAINT IF EXISTS datasources_type_check;
ALTER TABLE datasources ADD CONSTRAINT datasources_type_check CHECK (type IN ('prometheus', 'loki', 'tempo'));
