#!/bin/sh
# Runs once, when the PostgreSQL data directory is first created (docker-entrypoint-initdb.d).
# One server, one database per application: MLflow's tracking store, MLflow's user store
# (basic auth) and Prefect's database. Each keeps its own Alembic version table.
set -e  # also safe when the postgres entrypoint sources this file

for db in mlflow mlflow_auth prefect; do
  if ! psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c "CREATE DATABASE \"$db\""
  fi
done

# Prefect's migrations use trigram indexes.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname prefect -c "CREATE EXTENSION IF NOT EXISTS pg_trgm"
