#!/bin/sh
# MLflow server entrypoint: writes the basic-auth config from the environment, then runs "$@".
#
# MLflow's auth app reads an INI file (MLFLOW_AUTH_CONFIG_PATH). Its user store must be a real
# database in production, and its URI holds a password, so the file is written here at start
# (mode 600, never in the image) instead of being baked in. The admin user and password come
# straight from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, which MLflow reads
# itself: they create the admin on the first start only (change it later with the API).
set -eu

fail() { echo "mlflow entrypoint: $1" >&2; exit 64; }

[ -n "${MLFLOW_AUTH_DATABASE_URI:-}" ] || fail "MLFLOW_AUTH_DATABASE_URI is not set; set it to the user-store database, e.g. postgresql://USER:PASSWORD@postgres:5432/mlflow_auth"
[ -n "${MLFLOW_AUTH_ADMIN_USERNAME:-}" ] || fail "MLFLOW_AUTH_ADMIN_USERNAME is not set; set it (MLFLOW_ADMIN_USERNAME in infra/.env)"
[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] || fail "MLFLOW_AUTH_ADMIN_PASSWORD is not set; set it (MLFLOW_ADMIN_PASSWORD in infra/.env)"
case "$MLFLOW_AUTH_ADMIN_PASSWORD" in
  change-me*) fail "MLFLOW_AUTH_ADMIN_PASSWORD is still the placeholder from .env.example; set a real password" ;;
esac
[ "${#MLFLOW_AUTH_ADMIN_PASSWORD}" -ge 12 ] || fail "MLFLOW_AUTH_ADMIN_PASSWORD has ${#MLFLOW_AUTH_ADMIN_PASSWORD} characters; MLflow needs at least 12"
[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] || fail "MLFLOW_FLASK_SERVER_SECRET_KEY is not set; set it to a long random string (openssl rand -hex 32)"

permission="${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}"
case "$permission" in
  READ|EDIT|MANAGE|NO_PERMISSIONS) ;;
  *) fail "MLFLOW_AUTH_DEFAULT_PERMISSION=$permission is not one of READ, EDIT, MANAGE, NO_PERMISSIONS" ;;
esac

conf="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-auth/basic_auth.ini}"
mkdir -p "$(dirname "$conf")"
umask 077
# configparser reads '%' as interpolation: a URL-encoded password must have it doubled.
db_uri=$(printf '%s' "$MLFLOW_AUTH_DATABASE_URI" | sed 's/%/%%/g')
tmp="$conf.tmp.$$"
cat > "$tmp" <<EOF
[mlflow]
default_permission = $permission
database_uri = $db_uri
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
mv "$tmp" "$conf"
export MLFLOW_AUTH_CONFIG_PATH="$conf"

exec "$@"
