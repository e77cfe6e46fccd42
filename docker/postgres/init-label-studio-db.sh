#!/usr/bin/env bash
# Runs once, when the postgres container initialises an empty data directory (the official
# image runs every script in /docker-entrypoint-initdb.d/ then). It gives Label Studio a database
# and a login of its own, so that it never shares batchlab's tables or credentials.
# LABEL_STUDIO_DB_PASSWORD comes from docker/.env through the compose file. Changing it later
# does not change the role's password: run `ALTER ROLE labelstudio PASSWORD '...'` yourself, or
# start from a fresh volume.
set -euo pipefail

: "${LABEL_STUDIO_DB_PASSWORD:?set LABEL_STUDIO_DB_PASSWORD in docker/.env}"

# psql variables (-v) are quoted by psql itself (:'pw'), so any password is safe here.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v pw="$LABEL_STUDIO_DB_PASSWORD" <<'SQL'
CREATE ROLE labelstudio LOGIN PASSWORD :'pw';
CREATE DATABASE labelstudio OWNER labelstudio;
SQL
