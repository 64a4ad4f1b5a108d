-- Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
-- One server, one database per consumer; all owned by POSTGRES_USER from infra/.env.
-- The names must match the database part of the URLs in infra/compose.yaml.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE skf;
