#!/bin/sh
# genflow image entrypoint: points DVC at the stack's remote, then runs "$@".
#
# Only the *local* DVC config (.dvc/config.local, never committed) changes, so the repository's
# own remote stays what it is. Credentials are not written anywhere: DVC's S3 client reads
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment.
#   GENFLOW_DVC_REMOTE        e.g. s3://dvc           (unset: leave DVC as configured)
#   GENFLOW_DVC_ENDPOINT_URL  e.g. http://minio:9000  (S3-compatible stores; unset for AWS S3)
set -eu

if [ -n "${GENFLOW_DVC_REMOTE:-}" ] && [ -d .dvc ]; then
  dvc remote add --local --force --default stack "$GENFLOW_DVC_REMOTE" >/dev/null
  if [ -n "${GENFLOW_DVC_ENDPOINT_URL:-}" ]; then
    dvc remote modify --local stack endpointurl "$GENFLOW_DVC_ENDPOINT_URL"
  fi
fi

exec "$@"
