#!/usr/bin/env bash
# A local Ray cluster and S3 store on loopback, for trying `ray job submit` on one machine.
#   cluster/local.sh up     start a Ray head (127.0.0.1, usage stats off) and SeaweedFS S3
#   cluster/local.sh down   stop both
# Uses the project's .venv (run `make demo` or `make test` once to create it).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${VENV:-.venv}/bin
state=${VLSAE_LOCAL_STATE:-.vlsae-local}
s3_port=${S3_PORT:-8333}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-vlsae-local} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-vlsae-local-secret}

case "${1:-}" in
up)
  mkdir -p "$state"
  nohup "$bin/vlsae" local-s3 --dir "$state/seaweedfs" --port "$s3_port" --bucket vlsae >"$state/s3.log" 2>&1 &
  echo $! >"$state/s3.pid"
  export AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port
  "$bin/ray" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --dashboard-port=8265 \
    --disable-usage-stats
  cat <<MSG
Export these, then submit jobs with: ray job submit --working-dir . -- python jobs/train.py -c CONFIG
  export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265
  export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
MSG
  ;;
down)
  "$bin/ray" stop
  [[ -f $state/s3.pid ]] && kill "$(cat "$state/s3.pid")" 2>/dev/null || true
  rm -f "$state/s3.pid"
  ;;
*)
  echo "usage: cluster/local.sh up|down" >&2
  exit 2
  ;;
esac
